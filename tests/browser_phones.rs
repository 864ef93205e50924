//! Browser phones (issue 17): two real browser SIP stacks, JsSIP from the npm registry, each
//! in its own headless Chromium (Debian's `chromium`, fake microphone), register over secure
//! WebSocket (RFC 7118) to a server started here and call each other through it: both
//! report the call confirmed, ICE connects (the audio flows directly between the two
//! browsers, on loopback only), and either end hangs up: the first call the caller, the
//! second the callee, and a third call goes the other way.
//!
//! tests/browser/run.js drives the browsers and prints their events as JSON lines; this
//! test starts it, gives it the server's address, checks the events, and bounds and stops
//! everything it started (node and its Chromium processes share a process group, killed on
//! every path). It is skipped, with the reason printed, where chromium, node or
//! tests/browser/node_modules is missing; tests/setup-and-run.sh installs them.
//!
//! Network: as root (CI) the test runs in a network namespace of its own whose only
//! interface is loopback (the server's runtime, node and Chromium all inherit it), so
//! WebRTC gathers 127.0.0.1 candidates only and every ICE check and RTP packet stays on
//! 127.0.0.1. Without the privilege it runs on this machine's network: phone.js then keeps
//! only loopback candidates in the SDP, but Chromium's sockets on other interfaces may still
//! send checks towards 127.0.0.1 (and get answers at this machine's own address), so the
//! strict pair checks apply in the namespace only. Either way Chromium resolves no names
//! and has its background services off (tests/browser/run.js).
//!
//! Run alone: `cargo test --test browser_phones -- --nocapture` (prints the timings).
//! STROWGER_BROWSER_VERBOSE=1 prints every event, STROWGER_BROWSER_SCHEME=ws uses plain
//! WebSocket, STROWGER_BROWSER_SHARED_NETWORK=1 skips the namespace.

mod common;

use common::{start_with, test_config};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use strowger::transport::TransportKind;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The whole browser run: launch, register, three calls, unregister (about 7 s here).
/// STROWGER_BROWSER_LIMIT_S overrides it (a short one shows the kill path).
fn limit() -> Duration {
    let secs = std::env::var("STROWGER_BROWSER_LIMIT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}
/// What run.js gives itself (it stops its browsers then); under `limit()`.
const RUNNER_DEADLINE_MS: u64 = 50_000;

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"))
}

/// Why the browser test cannot run here, if it cannot.
fn missing_prerequisite() -> Option<String> {
    if !chromium().is_file() {
        return Some(format!(
            "{} is absent (Debian package chromium)",
            chromium().display()
        ));
    }
    let node = std::process::Command::new("node")
        .arg("--version")
        .stdin(Stdio::null())
        .output();
    let Ok(node) = node.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()) else {
        return Some("node is not on PATH".into());
    };
    // playwright-core needs Node 20 or later ("v20.20.2").
    let major: u32 = node
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 20 {
        return Some(format!(
            "node is {node:?}; playwright-core needs 20 or later"
        ));
    }
    for package in ["jssip", "playwright-core"] {
        let manifest = browser_dir()
            .join("node_modules")
            .join(package)
            .join("package.json");
        if !manifest.is_file() {
            return Some(format!(
                "{} is absent (npm ci in tests/browser)",
                manifest.display()
            ));
        }
    }
    None
}

/// Kills a process group (node and the Chromium browsers it spawned) when dropped.
struct ProcessGroup(i32);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: kill(2) with a negative pid signals the group we created for node (its pgid
        // is node's pid); it touches no memory.
        unsafe {
            libc::kill(-self.0, libc::SIGKILL);
        }
    }
}

/// A self-signed certificate for 127.0.0.1 and its key, as PEM files in `dir`.
fn write_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "127.0.0.1");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// One call of the run: who calls whom and who hangs up ("caller" or "callee").
struct CallSpec {
    from: &'static str,
    to: &'static str,
    hangup: &'static str,
}

/// The caller hangs up, then the callee, then the same the other way round (each phone
/// calls and is called through its one WebSocket connection).
const CALLS: [CallSpec; 3] = [
    CallSpec {
        from: "alice",
        to: "bob",
        hangup: "caller",
    },
    CallSpec {
        from: "alice",
        to: "bob",
        hangup: "callee",
    },
    CallSpec {
        from: "bob",
        to: "alice",
        hangup: "caller",
    },
];

/// What run.js printed and how it ended.
struct Run {
    events: Vec<Value>,
    status: Option<std::process::ExitStatus>,
    stderr: String,
}

impl Run {
    fn transcript(&self) -> String {
        let mut s: String = self.events.iter().map(|e| format!("{e}\n")).collect();
        if !self.stderr.is_empty() {
            s.push_str("--- run.js stderr ---\n");
            s.push_str(&self.stderr);
        }
        s
    }
    /// The events of `phone` (any call when `call` is None) named `event`.
    fn of<'a>(&'a self, phone: &'a str, call: Option<u64>, event: &'a str) -> Vec<&'a Value> {
        self.events
            .iter()
            .filter(|e| e["phone"] == phone && e["event"] == event)
            .filter(|e| call.is_none_or(|c| e["call"] == c))
            .collect()
    }
}

/// Starts run.js, a server whose `ws.allowed_origins` is run.js's page, lets the phones
/// make `CALLS`, and returns what they reported. `scheme` is "wss" or "ws".
async fn run_phones(scheme: &str) -> Run {
    let work = tempfile::tempdir().unwrap();
    let (cert, key) = write_cert(work.path());

    let mut child = tokio::process::Command::new("node")
        .arg("run.js")
        .current_dir(browser_dir())
        .env("CHROMIUM", chromium())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .expect("node starts");
    let group = ProcessGroup(child.id().expect("node's pid") as i32);
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr_task = tokio::spawn(async move {
        let mut s = String::new();
        let _ = stderr_pipe.read_to_string(&mut s).await;
        s
    });

    let mut events = Vec::new();
    let exchange = async {
        // 1. The page's origin, which the server must allow.
        let first = lines.next_line().await.ok().flatten().unwrap_or_default();
        let first: Value = serde_json::from_str(&first).unwrap_or(Value::Null);
        events.push(first.clone());
        // (No origin line: run.js failed to start; its stderr says why.)
        let origin = first["origin"].as_str().map(str::to_owned)?;

        // 2. The server: UDP and TCP as in every test, plus ws: and wss:.
        let mut config = test_config();
        config.sip.listen.push("ws:127.0.0.1:0".into());
        config.sip.listen.push("wss:127.0.0.1:0".into());
        config.tls.cert = cert.display().to_string();
        config.tls.key = key.display().to_string();
        config.ws.allowed_origins = vec![origin];
        let server = start_with(config).await;
        let kind = if scheme == "wss" {
            TransportKind::Wss
        } else {
            TransportKind::Ws
        };
        let addr = server.handle.addr(kind).expect("websocket listener bound");

        // 3. The run.
        let calls: Vec<Value> = CALLS
            .iter()
            .map(|c| serde_json::json!({"from": c.from, "to": c.to, "hangup": c.hangup}))
            .collect();
        let cfg = serde_json::json!({
            "ws": format!("{scheme}://{addr}"),
            "domain": "strowger.test",
            "cert": (scheme == "wss").then(|| cert.display().to_string()),
            "workdir": work.path().join("browsers").display().to_string(),
            "deadline_ms": RUNNER_DEADLINE_MS,
            "phones": ["alice", "bob"],
            "calls": calls,
        });
        stdin
            .write_all(format!("{cfg}\n").as_bytes())
            .await
            .unwrap();
        stdin.flush().await.unwrap();
        while let Ok(Some(line)) = lines.next_line().await {
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|_| serde_json::json!({"event": "unparsed", "text": line}));
            let last = v["event"] == "done" || v["event"] == "error";
            events.push(v);
            if last {
                break;
            }
        }
        let status = child.wait().await.ok();
        // Every call the browsers made is over at the server too.
        let deadline = Instant::now() + Duration::from_secs(3);
        while server.handle.active_calls() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        events.push(serde_json::json!({
            "event": "server",
            "active_calls": server.handle.active_calls(),
        }));
        status
    };
    let limit = limit();
    let status = match tokio::time::timeout(limit, exchange).await {
        Ok(status) => status,
        Err(_) => {
            events.push(serde_json::json!({"event": "error", "message": format!("the run took over {limit:?}")}));
            None
        }
    };
    // Stop whatever is left (nothing, on the good path) before reading stderr to its end.
    drop(group);
    let stderr = tokio::time::timeout(Duration::from_secs(5), stderr_task)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    Run {
        events,
        status,
        stderr,
    }
}

/// Whether a candidate as phone.js writes it ("udp 127.0.0.1:50000 host") is on loopback.
/// A peer-reflexive candidate's address is hidden by getStats ("udp :50000 prflx"): it
/// counts as loopback only in the loopback-only namespace (`isolated`), where nothing else
/// exists.
fn is_loopback(candidate: &str, isolated: bool) -> bool {
    let mut words = candidate.split(' ');
    let (addr, kind) = (words.nth(1).unwrap_or(""), words.next().unwrap_or(""));
    let ip = addr.rsplit_once(':').map_or(addr, |(ip, _port)| ip);
    let ip = ip.trim_start_matches('[').trim_end_matches(']');
    match ip.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback(),
        Err(_) => isolated && ip.is_empty() && kind == "prflx",
    }
}

/// `isolated`: the run had a loopback-only network namespace, where every ICE check and
/// the selected pair must be loopback. On a shared network the browsers' sockets on other
/// interfaces may still send checks towards 127.0.0.1 (the SDP carries loopback only).
fn check_run(run: &Run, isolated: bool) {
    let t = run.transcript();
    assert!(
        run.events.iter().any(|e| e["event"] == "done"),
        "the browser run did not finish:\n{t}"
    );
    assert!(
        run.status.is_some_and(|s| s.success()),
        "run.js failed ({:?}):\n{t}",
        run.status
    );
    for phone in ["alice", "bob"] {
        let reg = run.of(phone, None, "registered");
        assert!(
            reg.iter().any(|e| e["status"] == 200),
            "{phone} did not register:\n{t}"
        );
        assert!(
            run.of(phone, None, "failed").is_empty(),
            "{phone} had a failed call:\n{t}"
        );
    }
    for (i, spec) in CALLS.iter().enumerate() {
        let call = i as u64 + 1;
        for phone in [spec.from, spec.to] {
            assert!(
                !run.of(phone, Some(call), "confirmed").is_empty(),
                "call {call}: {phone} never confirmed:\n{t}"
            );
            // Media: ICE connected over a loopback pair, audio received, and no ICE check
            // was sent to or from anything but loopback.
            let media = run.of(phone, Some(call), "media");
            let m = media
                .first()
                .unwrap_or_else(|| panic!("call {call}: no media report from {phone}:\n{t}"));
            let ice = m["ice"].as_str().unwrap_or("");
            assert!(
                ice == "connected" || ice == "completed",
                "call {call}: {phone}'s ICE is {ice}:\n{t}"
            );
            for end in ["local", "remote"].into_iter().filter(|_| isolated) {
                let a = m["pair"][end].as_str().unwrap_or("");
                assert!(
                    is_loopback(a, isolated),
                    "call {call}: {phone}'s selected pair has {end} {a}:\n{t}"
                );
            }
            assert!(
                m["packetsReceived"].as_u64().unwrap_or(0) >= 25,
                "call {call}: {phone} received too little audio:\n{t}"
            );
            let checked = m["checked"].as_array().into_iter().flatten();
            for pair in checked.filter(|_| isolated) {
                for end in ["local", "remote"] {
                    let a = pair[end].as_str().unwrap_or("");
                    assert!(
                        is_loopback(a, isolated),
                        "call {call}: {phone} sent ICE checks on a non-loopback pair {pair}:\n{t}"
                    );
                }
            }
            // Every candidate offered or answered was loopback.
            for sdp in run.of(phone, Some(call), "sdp") {
                for c in sdp["candidates"].as_array().into_iter().flatten() {
                    let c = c.as_str().unwrap_or("");
                    assert!(
                        is_loopback(c, false),
                        "call {call}: {phone}: candidate {c}:\n{t}"
                    );
                }
            }
        }
        // The hang-up: the side that hung up ended it locally, the other heard the BYE.
        let (hanger, other) = if spec.hangup == "caller" {
            (spec.from, spec.to)
        } else {
            (spec.to, spec.from)
        };
        for (phone, originator) in [(hanger, "local"), (other, "remote")] {
            let ended = run.of(phone, Some(call), "ended");
            assert!(
                ended.iter().any(|e| e["originator"] == originator),
                "call {call} ({} hangs up): {phone} should end it as {originator}:\n{t}",
                spec.hangup
            );
        }
    }
    let server = run.events.iter().find(|e| e["event"] == "server");
    assert!(
        server.is_some_and(|s| s["active_calls"] == 0),
        "calls left at the server:\n{t}"
    );
}

/// Prints the timings run.js measured (seen with --nocapture).
fn print_summary(run: &Run) {
    if std::env::var_os("STROWGER_BROWSER_VERBOSE").is_some() {
        println!("{}", run.transcript());
    }
    for e in &run.events {
        match e["event"].as_str() {
            Some("browsers" | "call" | "done") => println!("{e}"),
            Some("media") => println!(
                "{} call {}: ice {} pair {} -> {}, {} packets received, {} sent",
                e["phone"],
                e["call"],
                e["ice"],
                e["pair"]["local"],
                e["pair"]["remote"],
                e["packetsReceived"],
                e["packetsSent"]
            ),
            _ => {}
        }
    }
}

/// Moves the calling thread (and so the threads and processes it starts: the server's
/// runtime, node, Chromium) into a new network namespace whose only interface is loopback,
/// brought up here. Needs CAP_SYS_ADMIN (root, as in CI). There WebRTC can gather loopback
/// candidates only, so no packet of the test can go anywhere but 127.0.0.1.
fn isolate_network() -> Result<(), String> {
    let os = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    // SAFETY: unshare(2) changes this thread's namespaces only; the ioctls get and set the
    // flags of "lo" through an ifreq we own, on a socket we close.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNET) != 0 {
            return Err(os("unshare(CLONE_NEWNET)"));
        }
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(os("socket"));
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (d, s) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        let mut result = Ok(());
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            result = Err(os("SIOCGIFFLAGS lo"));
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
                result = Err(os("SIOCSIFFLAGS lo up"));
            }
        }
        libc::close(fd);
        result
    }
}

#[test]
fn browser_phones_call_each_other_over_wss_and_either_hangs_up() {
    if let Some(why) = missing_prerequisite() {
        println!("skipped: {why}");
        eprintln!("skipped: {why}");
        return;
    }
    // STROWGER_BROWSER_SCHEME=ws runs the same over plain WebSocket (for debugging).
    let scheme = std::env::var("STROWGER_BROWSER_SCHEME").unwrap_or_else(|_| "wss".into());
    // A thread of its own, as the network namespace is per thread.
    let (run, isolated) = std::thread::spawn(move || {
        // STROWGER_BROWSER_SHARED_NETWORK=1: stay in this machine's network (to see the
        // fallback a non-root developer gets).
        let isolated = match std::env::var_os("STROWGER_BROWSER_SHARED_NETWORK") {
            Some(_) => Err("STROWGER_BROWSER_SHARED_NETWORK is set".to_string()),
            None => isolate_network(),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let run = rt.block_on(run_phones(&scheme));
        (run, isolated)
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    match &isolated {
        Ok(()) => println!("network: a namespace of its own, loopback only"),
        Err(why) => println!(
            "network: this machine's ({why}); non-loopback ICE candidates are left out of the SDP"
        ),
    }
    print_summary(&run);
    check_run(&run, isolated.is_ok());
}
