//! Issue 18, item 4: a node that dies with established calls. Its calls are recorded in
//! Redis (`<prefix>:calls:<node>`), and once its lease has run out a surviving node sends
//! a BYE to both parties of each, in their dialogs, and writes the call record
//! (`hangup_by = "takeover"`). The dying node is the real binary, killed with SIGKILL;
//! the survivor runs in process; the parties are raw UDP peers; Redis is a real
//! redis-server (the test command installs it).

mod common;

use common::redis::{start_redis, RedisServer};
use common::sipp::workdir;
use common::{eventually, header, request, start_with, status, test_config, unique, UdpPeer, WAIT};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The nodes' lease (`cluster.lease_s`, its minimum).
const LEASE_S: u64 = 3;

/// A node run as the real binary, killed by its PID (SIGKILL) when dropped.
struct Binary {
    child: Option<std::process::Child>,
    sip: SocketAddr,
    http: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    records: PathBuf,
}

impl Drop for Binary {
    fn drop(&mut self) {
        self.kill_9();
    }
}

impl Binary {
    /// Writes the node's config in `dir/<name>` and starts it; waits until it serves.
    async fn start(dir: &Path, name: &str, redis: &RedisServer, plan: &Path) -> Binary {
        let f = common::cluster_node_files(dir, name, &redis.url(), plan, LEASE_S, "");
        let mut node = Binary {
            child: None,
            sip: f.sip,
            http: f.http,
            config: f.config,
            log: f.log,
            records: f.records,
        };
        node.spawn().await;
        node
    }

    /// Starts the binary on the node's config (again, after a kill) and waits for it.
    async fn spawn(&mut self) {
        self.child = Some(common::spawn_strowger(&self.config, &self.log));
        let deadline = Instant::now() + Duration::from_secs(10);
        while strowger::admin::get(self.http, "/healthz").await.is_err() {
            assert!(
                Instant::now() < deadline,
                "node did not start:\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: the node dies without a word to anyone.
    fn kill_9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A dial plan that rings `callee`.
fn plan(dir: &Path, callee: SocketAddr) -> PathBuf {
    let p = dir.join("plan.lua");
    std::fs::write(
        &p,
        format!(
            "function on_invite(call) call:dial(\"sip:callee@{callee}\", {{ timeout = 10 }}) end\n"
        ),
    )
    .unwrap();
    p
}

async fn redis_con(redis: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url().as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn hlen(con: &redis::aio::MultiplexedConnection, key: &str) -> u64 {
    let mut con = con.clone();
    redis::cmd("HLEN")
        .arg(key)
        .query_async(&mut con)
        .await
        .unwrap()
}

/// The `tag` parameter of a From/To header value.
fn tag(value: &str) -> String {
    value
        .split(';')
        .find_map(|p| p.trim().strip_prefix("tag="))
        .unwrap_or("")
        .to_owned()
}

/// The URI inside `<...>` of a header value.
fn uri_of(value: &str) -> String {
    let start = value.find('<').map_or(0, |i| i + 1);
    let end = value[start..].find('>').map_or(value.len(), |i| start + i);
    value[start..end].to_owned()
}

fn cseq(msg: &str) -> u32 {
    header(msg, "CSeq")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The next request `method` (other messages skipped) and where it came from.
async fn recv_request(
    peer: &UdpPeer,
    method: &str,
    wait: Duration,
) -> Option<(String, SocketAddr)> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, from) = tokio::time::timeout_at(deadline, peer.sock.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        if msg.starts_with(&format!("{method} ")) {
            return Some((msg, from));
        }
    }
}

/// A response to `req`: its Via, From, To (with `to_tag` when it has none), Call-ID and
/// CSeq, and `extra` headers.
fn reply(req: &str, code: u16, to_tag: &str, extra: &str) -> String {
    let head = req.split("\r\n\r\n").next().unwrap_or("");
    let mut out = format!("SIP/2.0 {code} OK\r\n");
    for line in head.lines().skip(1) {
        let name = line.split(':').next().unwrap_or("").trim();
        if name.eq_ignore_ascii_case("Via") {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    let to = header(req, "To").unwrap_or("");
    let to = if tag(to).is_empty() {
        format!("{to};tag={to_tag}")
    } else {
        to.to_owned()
    };
    out.push_str(&format!(
        "From: {}\r\nTo: {to}\r\nCall-ID: {}\r\nCSeq: {}\r\n{extra}Content-Length: 0\r\n\r\n",
        header(req, "From").unwrap_or(""),
        header(req, "Call-ID").unwrap_or(""),
        header(req, "CSeq").unwrap_or(""),
    ));
    out
}

/// An established call's identifiers as each party sees them.
struct Call {
    /// The caller's dialog: Call-ID, its tag, the node's tag, the node's Contact.
    a_call_id: String,
    caller_tag: String,
    a_tag: String,
    a_contact: String,
    a_from: String,
    a_to: String,
    /// The callee's dialog: Call-ID, the node's tag, its own tag, the node's Contact.
    b_call_id: String,
    b_tag: String,
    callee_tag: String,
    b_contact: String,
    b_from: String,
    b_to: String,
    /// The node's CSeq of the B leg's INVITE.
    b_invite_seq: u32,
}

impl Call {
    /// The caller's BYE (CSeq 2) from `me`, to the node's Contact.
    fn caller_bye(&self, me: SocketAddr) -> String {
        format!(
            "BYE {contact} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{branch};rport\r\n\
             Max-Forwards: 70\r\nFrom: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\n\
             CSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n",
            contact = self.a_contact,
            branch = unique("bye"),
            from = self.a_from,
            to = self.a_to,
            call_id = self.a_call_id,
        )
    }
}

/// A call from `caller` through `node` to `callee`, answered and ACKed.
async fn establish(node: SocketAddr, caller: &UdpPeer, callee: &UdpPeer) -> Call {
    let call_id = unique("takeover");
    let invite = request(
        "INVITE",
        "sip:bob@strowger.test",
        caller.addr,
        "UDP",
        &call_id,
        &format!("Contact: <sip:alice@{}>\r\n", caller.addr),
        "",
    );
    caller.send(node, invite.as_bytes()).await;
    let (b_invite, from) = recv_request(callee, "INVITE", WAIT)
        .await
        .expect("the callee is rung");
    let callee_tag = unique("callee");
    let ok = reply(
        &b_invite,
        200,
        &callee_tag,
        &format!("Contact: <sip:callee@{}>\r\n", callee.addr),
    );
    callee.send(from, ok.as_bytes()).await;
    let a_ok = caller.recv_final(WAIT).await.expect("the caller's 200");
    assert_eq!(status(&a_ok), 200, "{a_ok}");
    let a_from = header(&a_ok, "From").unwrap().to_owned();
    let a_to = header(&a_ok, "To").unwrap().to_owned();
    let ack = format!(
        "ACK {contact} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{branch};rport\r\n\
         Max-Forwards: 70\r\nFrom: {a_from}\r\nTo: {a_to}\r\nCall-ID: {call_id}\r\n\
         CSeq: 1 ACK\r\nContent-Length: 0\r\n\r\n",
        contact = uri_of(header(&a_ok, "Contact").unwrap()),
        me = caller.addr,
        branch = unique("ack"),
    );
    caller.send(node, ack.as_bytes()).await;
    let (b_ack, _) = recv_request(callee, "ACK", WAIT)
        .await
        .expect("the callee's 200 is ACKed");
    Call {
        a_call_id: call_id,
        caller_tag: tag(&a_from),
        a_tag: tag(&a_to),
        a_contact: uri_of(header(&a_ok, "Contact").unwrap()),
        a_from,
        a_to,
        b_call_id: header(&b_invite, "Call-ID").unwrap().to_owned(),
        b_tag: tag(header(&b_invite, "From").unwrap()),
        callee_tag: tag(header(&b_ack, "To").unwrap()),
        b_contact: uri_of(header(&b_invite, "Contact").unwrap()),
        b_from: header(&b_ack, "From").unwrap().to_owned(),
        b_to: header(&b_ack, "To").unwrap().to_owned(),
        b_invite_seq: cseq(&b_invite),
    }
}

/// An in-dialog request from the callee (its own CSeq space), relayed by the node to
/// the caller, answered there and back: the node's CSeq on the caller's leg moves on.
async fn info_from_callee(node: SocketAddr, c: &Call, caller: &UdpPeer, callee: &UdpPeer) {
    let info = format!(
        "INFO {contact} SIP/2.0\r\nVia: SIP/2.0/UDP {me};branch=z9hG4bK{branch};rport\r\n\
         Max-Forwards: 70\r\nFrom: {from}\r\nTo: {to}\r\nCall-ID: {call_id}\r\n\
         CSeq: 1 INFO\r\nContent-Length: 0\r\n\r\n",
        contact = c.b_contact,
        me = callee.addr,
        branch = unique("info"),
        // The callee's view: its own tag in From, the node's in To.
        from = c.b_to,
        to = c.b_from,
        call_id = c.b_call_id,
    );
    callee.send(node, info.as_bytes()).await;
    let (relayed, from) = recv_request(caller, "INFO", WAIT)
        .await
        .expect("the INFO relayed to the caller");
    assert_eq!(header(&relayed, "Call-ID"), Some(c.a_call_id.as_str()));
    caller
        .send(from, reply(&relayed, 200, "", "").as_bytes())
        .await;
    let answer = callee.recv_final(WAIT).await.expect("the INFO answered");
    assert_eq!(status(&answer), 200, "{answer}");
}

/// The BYE a party gets from a node ending the call for a dead one: in its dialog, a
/// CSeq above `above`, a Reason naming the node. Answered 200.
fn check_bye(
    who: &str,
    bye: &str,
    (call_id, ours, theirs): (&str, &str, &str),
    above: u32,
    reason: &str,
) {
    assert_eq!(header(bye, "Call-ID"), Some(call_id), "{who}: {bye}");
    assert_eq!(tag(header(bye, "From").unwrap()), ours, "{who}: {bye}");
    assert_eq!(tag(header(bye, "To").unwrap()), theirs, "{who}: {bye}");
    assert!(cseq(bye) > above, "{who}: CSeq above {above}: {bye}");
    let r = header(bye, "Reason").unwrap_or("");
    assert!(
        r.starts_with("SIP;cause=503") && r.contains(reason),
        "{who}: {bye}"
    );
}

fn records(path: &Path) -> Vec<serde_json::Value> {
    common::read_records(path)
}

/// The issue's test: kill -9 a node with an established call; both parties get a BYE
/// from a surviving node within the lease time plus a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_call_is_ended_by_a_survivor() {
    let redis = start_redis().expect("redis-server (installed by tests/setup-and-run.sh)");
    let dir = workdir("takeover");
    let caller = UdpPeer::bind("127.0.0.1").await;
    let callee = UdpPeer::bind("127.0.0.1").await;
    let plan = plan(&dir, callee.addr);
    let mut a = Binary::start(&dir, "node-a", &redis, &plan).await;
    // The survivor, in process.
    let mut config = test_config();
    config.script.path = plan.display().to_string();
    config.redis.url = redis.url();
    config.cluster.enabled = true;
    config.cluster.node = "node-b".into();
    config.cluster.lease_s = LEASE_S;
    let b_records = dir.join("node-b-records.jsonl");
    config.call.records_file = b_records.display().to_string();
    let b = start_with(config).await;
    let con = redis_con(&redis).await;

    let c = establish(a.sip, &caller, &callee).await;
    info_from_callee(a.sip, &c, &caller, &callee).await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            hlen(&con, "strowger:cluster:calls:node-a").await == 1
        })
        .await,
        "node A recorded its established call in Redis"
    );

    let killed = Instant::now();
    a.kill_9();
    let limit = Duration::from_secs(LEASE_S + 3);
    let (to_caller, to_callee) = tokio::join!(
        recv_request(&caller, "BYE", limit),
        recv_request(&callee, "BYE", limit)
    );
    let took = killed.elapsed();
    let (bye_a, from_a) = to_caller.expect("the caller got a BYE within the lease + 3 s");
    let (bye_b, from_b) = to_callee.expect("the callee got a BYE within the lease + 3 s");
    eprintln!("BYEs {took:?} after the kill (lease {LEASE_S} s)");
    assert_eq!(from_a, b.udp, "the caller's BYE comes from the survivor");
    assert_eq!(from_b, b.udp, "the callee's BYE comes from the survivor");
    // The node's CSeq on the caller's leg was 1 (the relayed INFO); on the callee's, the
    // INVITE's.
    check_bye(
        "caller",
        &bye_a,
        (&c.a_call_id, &c.a_tag, &c.caller_tag),
        1,
        "node node-a failed",
    );
    check_bye(
        "callee",
        &bye_b,
        (&c.b_call_id, &c.b_tag, &c.callee_tag),
        c.b_invite_seq,
        "node node-a failed",
    );
    // To the caller's Contact (its remote target), not to where the INVITE came from.
    let caller_contact = format!("sip:alice@{}", caller.addr);
    assert_eq!(bye_a.split(' ').nth(1), Some(caller_contact.as_str()));
    caller
        .send(from_a, reply(&bye_a, 200, "", "").as_bytes())
        .await;
    callee
        .send(from_b, reply(&bye_b, 200, "", "").as_bytes())
        .await;

    // The survivor's call record says how the call ended.
    assert!(
        eventually(Duration::from_secs(3), || async {
            !records(&b_records).is_empty()
        })
        .await,
        "node B wrote a call record"
    );
    let r = &records(&b_records)[0];
    assert_eq!(r["hangup_by"], "takeover", "{r}");
    assert_eq!(r["taken_over_from"], "node-a", "{r}");
    assert_eq!(r["a_call_id"], c.a_call_id.as_str(), "{r}");
    assert_eq!(r["b_call_id"], c.b_call_id.as_str(), "{r}");
    assert_eq!(r["final_status"], 200, "{r}");
    assert!(r["answer"].is_string(), "{r}");
    assert!(r["duration_s"].as_f64().is_some_and(|d| d > 0.0), "{r}");
    assert_eq!(r["from"], "sip:alice@example.com", "{r}");

    // Redis: the dead node's records and set entry are gone; the metrics count it.
    assert_eq!(hlen(&con, "strowger:cluster:calls:node-a").await, 0);
    let mut cmd = con.clone();
    let nodes: Vec<String> = redis::cmd("SMEMBERS")
        .arg("strowger:cluster:nodes")
        .query_async(&mut cmd)
        .await
        .unwrap();
    assert_eq!(nodes, vec!["node-b".to_owned()]);
    let admin = b.handle.admin_addr();
    assert!(
        eventually(Duration::from_secs(3), || async {
            let m = strowger::admin::get(admin, "/metrics")
                .await
                .unwrap_or_default();
            m.contains("\nstrowger_cluster_calls_taken_over_total 1\n")
                && m.contains("\nstrowger_cluster_nodes_taken_over_total 1\n")
                && m.contains("\nstrowger_cluster_nodes_alive 1\n")
        })
        .await,
        "node B's metrics count the takeover"
    );
    // Every family dashboards/cluster.json reads is exposed.
    let m = strowger::admin::get(admin, "/metrics").await.unwrap();
    for family in [
        "strowger_cluster_nodes_alive",
        "strowger_cluster_call_records",
        "strowger_cluster_calls_taken_over_total",
        "strowger_cluster_nodes_taken_over_total",
        "strowger_cluster_record_writes_total",
        "strowger_cluster_record_errors_total",
        "strowger_cluster_lease_failures_total",
    ] {
        assert!(
            m.contains(&format!("\n{family} ")),
            "{family} exposed:\n{m}"
        );
    }
}

/// A node killed and started again under its name ends the calls of its previous life
/// itself (nobody else will: its lease is alive again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_ends_the_calls_of_its_previous_life() {
    let redis = start_redis().expect("redis-server (installed by tests/setup-and-run.sh)");
    let dir = workdir("takeover-restart");
    let caller = UdpPeer::bind("127.0.0.1").await;
    let callee = UdpPeer::bind("127.0.0.1").await;
    let plan = plan(&dir, callee.addr);
    let mut n = Binary::start(&dir, "node-r", &redis, &plan).await;
    let con = redis_con(&redis).await;
    let c = establish(n.sip, &caller, &callee).await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            hlen(&con, "strowger:cluster:calls:node-r").await == 1
        })
        .await,
        "the call is recorded"
    );
    n.kill_9();
    n.spawn().await;
    let (to_caller, to_callee) = tokio::join!(
        recv_request(&caller, "BYE", WAIT),
        recv_request(&callee, "BYE", WAIT)
    );
    let (bye_a, from_a) = to_caller.expect("the caller got a BYE from the restarted node");
    let (bye_b, from_b) = to_callee.expect("the callee got a BYE from the restarted node");
    assert_eq!((from_a, from_b), (n.sip, n.sip));
    check_bye(
        "caller",
        &bye_a,
        (&c.a_call_id, &c.a_tag, &c.caller_tag),
        0,
        "node node-r restarted",
    );
    check_bye(
        "callee",
        &bye_b,
        (&c.b_call_id, &c.b_tag, &c.callee_tag),
        c.b_invite_seq,
        "node node-r restarted",
    );
    caller
        .send(from_a, reply(&bye_a, 200, "", "").as_bytes())
        .await;
    callee
        .send(from_b, reply(&bye_b, 200, "", "").as_bytes())
        .await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            records(&n.records)
                .iter()
                .any(|r| r["hangup_by"] == "takeover" && r["a_call_id"] == c.a_call_id.as_str())
        })
        .await,
        "the restarted node wrote the call's record"
    );
    assert_eq!(hlen(&con, "strowger:cluster:calls:node-r").await, 0);
}

/// `INFO commandstats` as (command, calls).
async fn commandstats(con: &redis::aio::MultiplexedConnection) -> Vec<(String, u64)> {
    let mut con = con.clone();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut con)
        .await
        .unwrap();
    info.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

fn delta(before: &[(String, u64)], after: &[(String, u64)]) -> Vec<(String, u64)> {
    after
        .iter()
        .map(|(n, c)| {
            let was = before.iter().find(|(b, _)| b == n).map_or(0, |(_, c)| *c);
            (n.clone(), c - was)
        })
        .filter(|(_, d)| *d > 0)
        .collect()
}

/// A call that ends normally leaves no record behind; what calls cost in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_ended_normally_leaves_no_record() {
    let redis = start_redis().expect("redis-server (installed by tests/setup-and-run.sh)");
    let dir = workdir("takeover-normal");
    let caller = UdpPeer::bind("127.0.0.1").await;
    let callee = UdpPeer::bind("127.0.0.1").await;
    let mut config = test_config();
    config.script.path = plan(&dir, callee.addr).display().to_string();
    config.redis.url = redis.url();
    config.cluster.enabled = true;
    config.cluster.node = "solo".into();
    config.cluster.lease_s = LEASE_S;
    let s = start_with(config).await;
    let con = redis_con(&redis).await;
    let key = "strowger:cluster:calls:solo";

    const CALLS: u64 = 20;
    let before = commandstats(&con).await;
    let started = Instant::now();
    for i in 0..CALLS {
        let c = establish(s.udp, &caller, &callee).await;
        if i == 0 {
            assert!(
                eventually(Duration::from_secs(2), || async {
                    hlen(&con, key).await == 1
                })
                .await,
                "the established call is recorded"
            );
        }
        let bye = c.caller_bye(caller.addr);
        caller.send(s.udp, bye.as_bytes()).await;
        let ok = caller.recv_final(WAIT).await.expect("the BYE answered");
        assert_eq!(status(&ok), 200, "{ok}");
        let (b_bye, from) = recv_request(&callee, "BYE", WAIT)
            .await
            .expect("the callee's BYE");
        callee
            .send(from, reply(&b_bye, 200, "", "").as_bytes())
            .await;
    }
    assert!(
        eventually(Duration::from_secs(2), || async {
            hlen(&con, key).await == 0
        })
        .await,
        "no record left once the calls ended"
    );
    // The writer gathers changes for 50 ms: HLEN may read 0 before the last call's own
    // changes are flushed. Let them go before the idle window starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let busy = started.elapsed();
    let after = commandstats(&con).await;
    // Two seconds idle: what the node sends anyway (lease, scans, other stores).
    let quiet = Duration::from_secs(2);
    tokio::time::sleep(quiet).await;
    let idle = commandstats(&con).await;
    let calls = delta(&before, &after);
    let background = delta(&after, &idle);
    eprintln!("{CALLS} calls in {busy:?}: Redis commands {calls:?}");
    eprintln!("then {quiet:?} idle: {background:?}");
    let of = |d: &[(String, u64)], n: &str| d.iter().find(|(c, _)| c == n).map_or(0, |(_, c)| *c);
    assert!(
        of(&calls, "hset") <= CALLS && of(&calls, "hdel") <= CALLS,
        "at most one HSET and one HDEL per call: {calls:?}"
    );
    assert_eq!(of(&background, "hset") + of(&background, "hdel"), 0);

    // A graceful stop leaves the cluster at once (no lease to wait for).
    s.handle.shutdown(Duration::from_millis(100)).await;
    let mut cmd = con.clone();
    let (lease, nodes): (Option<String>, Vec<String>) = redis::pipe()
        .cmd("GET")
        .arg("strowger:cluster:node:solo")
        .cmd("SMEMBERS")
        .arg("strowger:cluster:nodes")
        .query_async(&mut cmd)
        .await
        .unwrap();
    assert_eq!((lease, nodes), (None, Vec::<String>::new()));
}

/// A TCP proxy to Redis that can be cut (its connections closed, new ones dropped at
/// once) and restored: a network outage between the nodes and Redis, Redis running on.
struct Proxy {
    addr: SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    kill: tokio::sync::broadcast::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = self.kill.send(());
    }
}

impl Proxy {
    async fn start(to: SocketAddr) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (kill, _) = tokio::sync::broadcast::channel(4);
        let task = tokio::spawn({
            let cut = cut.clone();
            let kill = kill.clone();
            async move {
                while let Ok((mut down, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        continue;
                    }
                    let mut killed = kill.subscribe();
                    tokio::spawn(async move {
                        let Ok(mut up) = tokio::net::TcpStream::connect(to).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                            _ = killed.recv() => {}
                        }
                    });
                }
            }
        });
        Proxy {
            addr,
            cut,
            kill,
            task,
        }
    }

    fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.kill.send(());
    }

    fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Redis out of reach of every node for longer than the lease is no node's death: once
/// Redis answers again, the nodes wait until the others have renewed before judging
/// anyone dead, so the call survives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_longer_than_the_lease_ends_no_call() {
    let redis = start_redis().expect("redis-server (installed by tests/setup-and-run.sh)");
    let proxy = Proxy::start(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    let dir = workdir("takeover-outage");
    let caller = UdpPeer::bind("127.0.0.1").await;
    let callee = UdpPeer::bind("127.0.0.1").await;
    let plan = plan(&dir, callee.addr);
    let node = |name: &str| {
        let mut config = test_config();
        config.script.path = plan.display().to_string();
        config.redis.url = proxy.url();
        config.cluster.enabled = true;
        config.cluster.node = name.into();
        config.cluster.lease_s = LEASE_S;
        config
    };
    let a = start_with(node("node-a")).await;
    let b = start_with(node("node-b")).await;
    let con = redis_con(&redis).await;
    let c = establish(a.udp, &caller, &callee).await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            hlen(&con, "strowger:cluster:calls:node-a").await == 1
        })
        .await,
        "the call is recorded"
    );

    proxy.cut();
    tokio::time::sleep(Duration::from_secs(LEASE_S + 2)).await;
    let mut cmd = con.clone();
    let leases: u64 = redis::cmd("EXISTS")
        .arg("strowger:cluster:node:node-a")
        .arg("strowger:cluster:node:node-b")
        .query_async(&mut cmd)
        .await
        .unwrap();
    assert_eq!(leases, 0, "both leases ran out during the outage");
    proxy.restore();

    // Two leases and a bit after Redis is back, nobody was taken over.
    let watch = Duration::from_secs(2 * LEASE_S + 1);
    let (to_caller, to_callee) = tokio::join!(
        recv_request(&caller, "BYE", watch),
        recv_request(&callee, "BYE", watch)
    );
    assert!(to_caller.is_none(), "no BYE to the caller: {to_caller:?}");
    assert!(to_callee.is_none(), "no BYE to the callee: {to_callee:?}");
    assert_eq!(hlen(&con, "strowger:cluster:calls:node-a").await, 1);
    let mut cmd = con.clone();
    let mut nodes: Vec<String> = redis::cmd("SMEMBERS")
        .arg("strowger:cluster:nodes")
        .query_async(&mut cmd)
        .await
        .unwrap();
    nodes.sort();
    assert_eq!(nodes, ["node-a", "node-b"]);
    for n in [&a, &b] {
        let m = strowger::admin::get(n.handle.admin_addr(), "/metrics")
            .await
            .unwrap();
        assert!(
            m.contains("\nstrowger_cluster_nodes_taken_over_total 0\n"),
            "{m}"
        );
    }
    // The call is still the node's: the caller hangs up and the callee hears of it.
    let bye = c.caller_bye(caller.addr);
    caller.send(a.udp, bye.as_bytes()).await;
    assert_eq!(
        status(&caller.recv_final(WAIT).await.unwrap_or_default()),
        200
    );
    assert!(recv_request(&callee, "BYE", WAIT).await.is_some());
}
