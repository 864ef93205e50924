//! The registrar against both stores: the same suite runs on SQLite (a temp dir) and on
//! a real redis-server started here on a free port; then two registrars on one Redis, as
//! two nodes, must see each other's changes. Public API only.

mod common;

use common::redis::{start_redis, start_redis_on};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use strowger::registrar::{
    BindingStore, RedisStore, RegisterSource, Registrar, RegistrarConfig, SqliteStore,
};
use strowger::sip::{parse, Request, Response, SipMessage};
use strowger::transport::TransportKind;

type Opener = Box<dyn Fn() -> Pin<Box<dyn Future<Output = Arc<dyn BindingStore>>>>>;

fn cfg() -> RegistrarConfig {
    RegistrarConfig {
        min_expires: 2,
        max_expires: 600,
        default_expires: 300,
        max_contacts: 0,
    }
}

fn request(aor_user: &str, call_id: &str, cseq: u32, extra: &[&str]) -> Request {
    let mut s = format!(
        "REGISTER sip:example.com SIP/2.0\r\n\
         Via: SIP/2.0/TCP [2001:db8::1]:5070;branch=z9hG4bK{cseq}{call_id}\r\n\
         From: <sip:{aor_user}@example.com>;tag=f{cseq}\r\n\
         To: <sip:{aor_user}@example.com>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: {cseq} REGISTER\r\n\
         User-Agent: suite/1\r\n"
    );
    for h in extra {
        s.push_str(h);
        s.push_str("\r\n");
    }
    s.push_str("Content-Length: 0\r\n\r\n");
    match parse(s.as_bytes()) {
        Ok((SipMessage::Request(r), _)) => r,
        other => panic!("test request does not parse: {other:?}"),
    }
}

fn src() -> RegisterSource {
    RegisterSource {
        transport: TransportKind::Tcp,
        addr: "[2001:db8::1]:5070".parse().unwrap(),
        connection: Some(7),
    }
}

fn aor(user: &str) -> String {
    format!("sip:{user}@example.com")
}

fn contacts(r: &Response) -> Vec<String> {
    r.headers.get_all("Contact").map(str::to_owned).collect()
}

/// Expires value of each Contact of a 200, in order.
fn expiries(r: &Response) -> Vec<u64> {
    contacts(r)
        .iter()
        .map(|c| {
            let v = c.split(";expires=").nth(1).expect("expires in 200");
            v.split(';').next().unwrap().parse().unwrap()
        })
        .collect()
}

async fn reg(r: &Registrar, user: &str, call_id: &str, cseq: u32, extra: &[&str]) -> Response {
    r.register(&request(user, call_id, cseq, extra), src(), &aor(user))
        .await
}

async fn stored(store: &Arc<dyn BindingStore>, user: &str) -> Vec<String> {
    let mut v: Vec<String> = store
        .load_aor(&aor(user))
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.contact)
        .collect();
    v.sort();
    v
}

/// The whole suite against one backend; `open` opens the same storage again each time.
async fn suite(open: Opener) {
    let store = open().await;
    let r = Registrar::start(cfg(), store.clone()).await.unwrap();

    // Add, refresh, remove.
    let resp = reg(
        &r,
        "add",
        "c1",
        1,
        &["Contact: <sip:add@192.0.2.1:5060>;expires=120"],
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        contacts(&resp),
        ["<sip:add@192.0.2.1:5060>;expires=120;q=1"]
    );
    let b = &r.lookup(&aor("add"))[0];
    assert_eq!(b.source, "tcp:[2001:db8::1]:5070");
    assert_eq!(b.connection, Some(7));
    assert_eq!(b.user_agent.as_deref(), Some("suite/1"));
    let resp = reg(
        &r,
        "add",
        "c1",
        2,
        &["Contact: <sip:add@192.0.2.1:5060>", "Expires: 200"],
    )
    .await;
    assert_eq!(expiries(&resp), [200]);
    assert_eq!(r.lookup(&aor("add")).len(), 1);
    assert_eq!(stored(&store, "add").await, ["sip:add@192.0.2.1:5060"]);
    let resp = reg(
        &r,
        "add",
        "c1",
        3,
        &["Contact: <sip:add@192.0.2.1:5060>;expires=0"],
    )
    .await;
    assert_eq!(resp.status, 200);
    assert!(contacts(&resp).is_empty());
    assert!(r.lookup(&aor("add")).is_empty());
    assert!(stored(&store, "add").await.is_empty());

    // Several contacts, q ordering, per-contact expires, a query lists them all.
    let resp = reg(
        &r,
        "multi",
        "c2",
        1,
        &[
            "Contact: <sip:low@h>;q=0.1;expires=30, <sip:high@h>;q=0.9",
            "Contact: <sip:mid@h>;q=0.5;expires=45",
            "Expires: 90",
        ],
    )
    .await;
    assert_eq!(resp.status, 200);
    let order: Vec<String> = r
        .lookup(&aor("multi"))
        .into_iter()
        .map(|b| b.contact)
        .collect();
    assert_eq!(order, ["sip:high@h", "sip:mid@h", "sip:low@h"]);
    assert_eq!(expiries(&resp), [90, 45, 30]);
    let query = reg(&r, "multi", "c2", 2, &[]).await;
    assert_eq!(query.status, 200);
    assert_eq!(contacts(&query).len(), 3);
    assert_eq!(stored(&store, "multi").await.len(), 3);

    // 423 below the minimum, cap at the maximum.
    let resp = reg(&r, "lim", "c3", 1, &["Contact: <sip:x@h>;expires=1"]).await;
    assert_eq!(resp.status, 423);
    assert_eq!(resp.headers.get("Min-Expires"), Some("2"));
    let resp = reg(&r, "lim", "c3", 2, &["Contact: <sip:x@h>;expires=86400"]).await;
    assert_eq!(expiries(&resp), [600]);

    // Out-of-order CSeq does not undo the newer REGISTER.
    let resp = reg(&r, "ooo", "c4", 10, &["Contact: <sip:new@h>"]).await;
    assert_eq!(resp.status, 200);
    let resp = reg(&r, "ooo", "c4", 9, &["Contact: <sip:new@h>;expires=0"]).await;
    assert_eq!(resp.status, 500);
    assert_eq!(stored(&store, "ooo").await, ["sip:new@h"]);
    assert_eq!(r.lookup(&aor("ooo")).len(), 1);

    // `*` removes everything.
    reg(&r, "star", "c5", 1, &["Contact: <sip:a@h>, <sip:b@h>"]).await;
    assert_eq!(r.lookup(&aor("star")).len(), 2);
    let resp = reg(&r, "star", "c5", 2, &["Contact: *", "Expires: 0"]).await;
    assert_eq!(resp.status, 200);
    assert!(r.lookup(&aor("star")).is_empty());
    assert!(stored(&store, "star").await.is_empty());

    // A device re-registering from elsewhere replaces its own binding (RFC 5626 6).
    let inst = "+sip.instance=\"<urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6>\";reg-id=1";
    reg(
        &r,
        "dev",
        "c6",
        1,
        &[&format!("Contact: <sip:dev@192.0.2.9:5060>;{inst}")],
    )
    .await;
    let resp = reg(
        &r,
        "dev",
        "c7",
        1,
        &[&format!("Contact: <sip:dev@198.51.100.3:6000>;{inst}")],
    )
    .await;
    assert_eq!(resp.status, 200);
    assert_eq!(stored(&store, "dev").await, ["sip:dev@198.51.100.3:6000"]);
    let b = &r.lookup(&aor("dev"))[0];
    assert_eq!(
        b.instance.as_deref(),
        Some("<urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6>")
    );
    assert_eq!(b.reg_id, Some(1));

    // Path is kept with the binding and echoed when supported (RFC 3327).
    let resp = reg(
        &r,
        "path",
        "c8",
        1,
        &[
            "Path: <sip:edge1.example.net;lr>, <sip:edge2.example.net;lr>",
            "Supported: path",
            "Contact: <sip:p@10.0.0.1>",
        ],
    )
    .await;
    assert_eq!(resp.headers.get_all("Path").count(), 2);
    let path = &r.lookup(&aor("path"))[0].path;
    assert_eq!(
        path,
        &["<sip:edge1.example.net;lr>", "<sip:edge2.example.net;lr>"]
    );

    // Malformed Contact or Expires: 400 naming it, nothing written.
    for (i, (extra, reason)) in [
        (
            vec!["Contact: <sip:ok@h>, <sip:bad@h>;expires=x"],
            "Bad expires parameter in Contact",
        ),
        (
            vec!["Contact: <sip:ok@h>", "Expires: 1O"],
            "Malformed Expires header",
        ),
        (
            vec!["Contact: <sip:ok@h>, <sip:bad@h"],
            "Malformed Contact header (missing '>')",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let resp = reg(&r, "bad", "c9", i as u32 + 1, &extra).await;
        assert_eq!((resp.status, resp.reason.as_str()), (400, reason));
    }
    assert!(r.lookup(&aor("bad")).is_empty());
    assert!(stored(&store, "bad").await.is_empty());

    // Expiry on time: a 2 s binding lapses, its 60 s sibling stays, in cache and store.
    reg(
        &r,
        "short",
        "c10",
        1,
        &["Contact: <sip:brief@h>;expires=2, <sip:long@h>;expires=60"],
    )
    .await;
    assert_eq!(r.lookup(&aor("short")).len(), 2);
    let count_before = r.count();
    let deadline = Instant::now() + Duration::from_millis(4500);
    while r.stats().expired.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "the 2 s binding did not expire");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left: Vec<String> = r
        .lookup(&aor("short"))
        .into_iter()
        .map(|b| b.contact)
        .collect();
    assert_eq!(left, ["sip:long@h"]);
    assert_eq!(r.count(), count_before - 1);
    assert_eq!(stored(&store, "short").await, ["sip:long@h"]);

    // Persistence: drop everything, open the same storage again.
    let before = r.bindings();
    drop(r);
    drop(store);
    let store = open().await;
    let r = Registrar::start(cfg(), store).await.unwrap();
    assert_eq!(r.bindings(), before);
    assert_eq!(r.lookup(&aor("path"))[0].path.len(), 2);
    assert_eq!(r.lookup(&aor("multi")).len(), 3);
    // CSeq state survived too: the out-of-order rule still holds after a restart.
    let resp = reg(&r, "ooo", "c4", 10, &["Contact: <sip:new@h>;expires=0"]).await;
    assert_eq!(resp.status, 500);
}

#[tokio::test]
async fn sqlite_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("data");
    let open: Opener = Box::new(move || {
        let path = path.clone();
        Box::pin(
            async move { Arc::new(SqliteStore::open(&path).unwrap()) as Arc<dyn BindingStore> },
        )
    });
    suite(open).await;
    assert!(dir.path().join("data/registrations.sqlite").exists());
}

#[tokio::test]
async fn redis_backend() {
    let Some(server) = start_redis() else {
        eprintln!(
            "SKIPPED redis half: redis-server is not installed or did not start \
             (apt-get install -y redis-server)"
        );
        return;
    };
    let url = format!("redis://127.0.0.1:{}/", server.port);
    let open: Opener = Box::new(move || {
        let url = url.clone();
        Box::pin(async move {
            Arc::new(RedisStore::connect(&url).await.unwrap()) as Arc<dyn BindingStore>
        })
    });
    suite(open).await;
    drop(server);
}

/// Polls `cond` every 20 ms for up to a second: how long another node may lag.
async fn within_1s(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while !cond() {
        assert!(Instant::now() < deadline, "not within 1 s: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two nodes on one Redis: a phone registers on node A and is called through node B.
#[tokio::test]
async fn redis_two_nodes() {
    let Some(server) = start_redis() else {
        eprintln!("SKIPPED: redis-server is not installed or did not start");
        return;
    };
    let port = server.port;
    let url = format!("redis://127.0.0.1:{port}/");
    let node = || async {
        let store = RedisStore::connect_with_prefix(&url, "two:reg")
            .await
            .unwrap();
        Registrar::start(cfg(), Arc::new(store)).await.unwrap()
    };
    let (a, b) = (node().await, node().await);
    let phone = "sip:phone@192.0.2.7:5060";

    // Registered on A: B finds it by AOR and by contact.
    let resp = reg(&a, "phone", "n1", 1, &[&format!("Contact: <{phone}>")]).await;
    assert_eq!(resp.status, 200);
    within_1s("B sees A's REGISTER", || b.lookup(&aor("phone")).len() == 1).await;
    let found = b.binding_for_contact(phone).expect("B knows the contact");
    assert_eq!(found.aor, aor("phone"));
    assert_eq!(found.source, "tcp:[2001:db8::1]:5070");
    assert_eq!(b.count(), 1);

    // A refresh from B with a second contact shows up on A (both directions work).
    let resp = reg(&b, "phone", "n1", 2, &["Contact: <sip:phone@198.51.100.2>"]).await;
    assert_eq!(resp.status, 200);
    within_1s("A sees B's REGISTER", || a.lookup(&aor("phone")).len() == 2).await;

    // Unregistered on A: gone on B.
    let resp = reg(&a, "phone", "n1", 3, &["Contact: *", "Expires: 0"]).await;
    assert_eq!(resp.status, 200);
    within_1s("B sees the removal", || {
        b.lookup(&aor("phone")).is_empty() && b.binding_for_contact(phone).is_none()
    })
    .await;
    assert_eq!(b.count(), 0);

    // A short binding from A lapses on B too (min_expires is 2 here).
    let brief = "sip:brief@192.0.2.8";
    reg(
        &a,
        "brief",
        "n2",
        1,
        &[&format!("Contact: <{brief}>;expires=2")],
    )
    .await;
    within_1s("B sees the brief binding", || {
        b.binding_for_contact(brief).is_some()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(4);
    while b.binding_for_contact(brief).is_some() || b.count() != 0 {
        assert!(
            Instant::now() < deadline,
            "the brief binding did not lapse on B"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(b.lookup(&aor("brief")).is_empty());

    // Redis restarts empty (no persistence here): nothing panics, and once it is back B
    // catches up by re-reading everything, including what it missed.
    reg(&a, "old", "n3", 1, &["Contact: <sip:old@h>"]).await;
    within_1s("B sees the binding before the restart", || {
        b.lookup(&aor("old")).len() == 1
    })
    .await;
    drop(server);
    let resp = reg(&a, "down", "n4", 1, &["Contact: <sip:down@h>"]).await;
    assert_eq!(resp.status, 500);
    assert_eq!(b.lookup(&aor("old")).len(), 1, "B keeps serving its cache");
    let _server = start_redis_on(port).expect("redis-server restarts on its port");
    let deadline = Instant::now() + Duration::from_secs(5);
    while reg(&a, "back", "n5", 1, &["Contact: <sip:back@h>"])
        .await
        .status
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "A never reached the restarted redis"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(b.lookup(&aor("back")).len() == 1 && b.lookup(&aor("old")).is_empty()) {
        assert!(
            Instant::now() < deadline,
            "B did not catch up after the restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The last clone dropped: the sync tasks end and their subscriptions close.
    let con = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let subscribers = || {
        let mut con = con.clone();
        async move {
            let (_, n): (String, u64) = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg("two:reg:changed")
                .query_async(&mut con)
                .await
                .unwrap();
            n
        }
    };
    assert_eq!(subscribers().await, 2);
    drop((a, b));
    let deadline = Instant::now() + Duration::from_secs(1);
    while subscribers().await != 0 {
        assert!(
            Instant::now() < deadline,
            "subscriptions outlive the registrars"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Throughput probe for the benchmark target (5,000 REGISTERs/s over 100,000 stored
/// bindings). Not a pass/fail test: run with
/// `cargo test --release --test registrar_store -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn sqlite_throughput_probe() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn BindingStore> = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let cfg = RegistrarConfig {
        min_expires: 60,
        max_expires: 3600,
        default_expires: 3600,
        max_contacts: 0,
    };
    let r = Registrar::start(cfg.clone(), store.clone()).await.unwrap();
    let n = 100_000u32;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for shard in 0..8u32 {
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            for i in (shard..n).step_by(8) {
                let user = format!("u{i}");
                let c = format!(
                    "Contact: <sip:{user}@10.{}.{}.1:5060>",
                    i / 256 % 256,
                    i % 256
                );
                let resp = reg(&r, &user, "bench", 1, &[&c]).await;
                assert_eq!(resp.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!("{n} REGISTERs in {secs:.2} s: {:.0}/s", n as f64 / secs);
    drop(r);
    let started = Instant::now();
    let r = Registrar::start(cfg, store).await.unwrap();
    eprintln!(
        "restart loaded {} bindings in {:.2} s",
        r.count(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(r.count(), n as usize);
}

/// The 200 promises durability: a process killed with SIGKILL right after answering keeps
/// its bindings. The child is this test binary running `kill9_child`.
#[tokio::test]
async fn sqlite_survives_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "kill9_child", "--ignored", "--nocapture"])
        .env("STROWGER_KILL9_DIR", dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready.exists() {
        assert!(
            Instant::now() < deadline,
            "child never answered its REGISTER"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Child::kill is SIGKILL on Unix: no destructor, no clean shutdown of SQLite.
    child.kill().unwrap();
    let _ = child.wait();
    let store = Arc::new(SqliteStore::open(dir.path()).unwrap());
    let r = Registrar::start(cfg(), store).await.unwrap();
    let got: Vec<String> = r
        .lookup(&aor("k9"))
        .into_iter()
        .map(|b| b.contact)
        .collect();
    assert_eq!(got, ["sip:k9@192.0.2.44:5060"]);
}

/// Half of `sqlite_survives_kill_9`: registers, says so, and waits to be killed.
#[tokio::test]
#[ignore]
async fn kill9_child() {
    let Ok(dir) = std::env::var("STROWGER_KILL9_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let store = Arc::new(SqliteStore::open(&dir).unwrap());
    let r = Registrar::start(cfg(), store).await.unwrap();
    let resp = reg(&r, "k9", "k", 1, &["Contact: <sip:k9@192.0.2.44:5060>"]).await;
    assert_eq!(resp.status, 200);
    std::fs::write(dir.join("ready"), b"1").unwrap();
    tokio::time::sleep(Duration::from_secs(30)).await;
}
