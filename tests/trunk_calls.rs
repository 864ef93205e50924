//! Calls through trunks (issue 16): SIPp as a carrier that challenges the PBX's INVITE
//! with 407, a carrier that refuses the credentials, and failover from a trunk at its
//! `max_channels` to a backup trunk; the caller is SIPp too, the dial plan is Lua.

mod common;

use common::sipp::{self, SeenMessage};
use common::*;
use md5::{Digest, Md5};
use std::path::{Path, PathBuf};
use std::time::Duration;
use strowger::trunk::TrunkConfig;

const LIMIT: Duration = Duration::from_secs(40);

/// The dial plan: numbers go out through `carrier1`, and to `backup` when carrier1
/// cannot take the call here (down or full: source "local", status 503).
fn script(dir: &Path) -> PathBuf {
    let path = dir.join("plan.lua");
    std::fs::write(
        &path,
        r#"
function on_invite(call)
  if call.trunk ~= "backup" then
    call:reject(500, "call.trunk is " .. tostring(call.trunk))
    return
  end
  local r = call:dial({ trunk = "carrier1", user = call.ruri.user }, { caller_id = "+15550000" })
  if not r.answered and r.source == "local" and r.status == 503 then
    log.info("carrier1: ", r.reason, "; trying backup")
    call:dial({ trunk = "backup", user = call.ruri.user })
  end
end
"#,
    )
    .unwrap();
    path
}

struct Setup {
    server: TestServer,
    dir: PathBuf,
    carrier: u16,
    backup: u16,
}

async fn setup(tag: &str, password: &str, max_channels: u32) -> Setup {
    setup_with(tag, password, max_channels, |_| {}).await
}

async fn setup_with(
    tag: &str,
    password: &str,
    max_channels: u32,
    tweak: impl FnOnce(&mut strowger::config::Config),
) -> Setup {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("TEST_LOG").unwrap_or_else(|_| "off".into()))
        .with_test_writer()
        .try_init();
    let dir = sipp::workdir(tag);
    let (carrier, backup) = (sipp::free_udp_port(), sipp::free_udp_port());
    let mut config = test_config();
    config.script.path = script(&dir).display().to_string();
    config.trunks.insert(
        "carrier1".into(),
        TrunkConfig {
            uri: format!("sip:127.0.0.1:{carrier}"),
            username: "pbx".into(),
            password: password.into(),
            from_domain: "pbx.example.com".into(),
            max_channels,
            ..TrunkConfig::default()
        },
    );
    config.trunks.insert(
        "backup".into(),
        TrunkConfig {
            host: "127.0.0.1".into(),
            port: backup,
            inbound: vec!["127.0.0.0/8".into()],
            caller_id: "ppi".into(),
            ..TrunkConfig::default()
        },
    );
    tweak(&mut config);
    let server = start_with(config).await;
    Setup {
        server,
        dir,
        carrier,
        backup,
    }
}

fn caller(s: &Setup, scenario: &str, number: &str, hold_ms: u64) -> sipp::Sipp {
    sipp::start(
        &s.dir,
        &format!("caller-{number}"),
        Path::new(scenario),
        sipp::free_udp_port(),
        Some(s.server.udp),
        &["-s", number, "-d", &hold_ms.to_string()],
    )
}

fn invites(seen: &[SeenMessage]) -> Vec<&SeenMessage> {
    seen.iter()
        .filter(|m| !m.sent && m.kind() == "INVITE")
        .collect()
}

/// A digest parameter's value (quoted or not).
fn param<'a>(value: &'a str, name: &str) -> &'a str {
    let at = value
        .find(&format!(" {name}="))
        .or_else(|| value.find(&format!(",{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {value}"))
        + name.len()
        + 2;
    let rest = &value[at..];
    match rest.strip_prefix('"') {
        Some(q) => &q[..q.find('"').unwrap()],
        None => rest.split([',', ' ']).next().unwrap(),
    }
}

fn md5_hex(s: &str) -> String {
    hex::encode(Md5::digest(s.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_through_a_trunk_answers_its_407_once_and_connects() {
    let s = setup("trunk-auth", "secret", 0).await;
    let carrier = sipp::start(
        &s.dir,
        "carrier",
        Path::new("carrier_invite_auth.xml"),
        s.carrier,
        None,
        &[],
    );
    let a = caller(&s, "uac_call.xml", "+15551234", 300);
    let seen_a = a.expect_success(LIMIT).await;
    let seen_c = carrier.expect_success(LIMIT).await;
    assert!(seen_a.iter().any(|m| !m.sent && m.kind() == "200"));
    let inv = invites(&seen_c);
    assert_eq!(inv.len(), 2, "the INVITE, then once with credentials");
    let (first, second) = (inv[0], inv[1]);
    assert!(first
        .first_line()
        .starts_with(&format!("INVITE sip:+15551234@127.0.0.1:{} ", s.carrier)));
    // RFC 3261 22.2: same Call-ID and From tag, a new CSeq.
    assert_eq!(first.header("Call-ID"), second.header("Call-ID"));
    assert_eq!(first.header("From"), second.header("From"));
    assert_eq!(first.header("CSeq"), Some("1 INVITE"));
    assert_eq!(second.header("CSeq"), Some("2 INVITE"));
    // Caller ID and identity for the carrier (RFC 3325).
    let from = first.header("From").unwrap();
    assert!(from.contains("sip:+15550000@pbx.example.com"), "{from}");
    assert_eq!(
        first.header("P-Asserted-Identity"),
        Some("<sip:+15550000@pbx.example.com>")
    );
    // The answer is right: computed here from the carrier's challenge (RFC 7616 3.4.1).
    let auth = second.header("Proxy-Authorization").expect("credentials");
    assert_eq!(param(auth, "username"), "pbx");
    assert_eq!(param(auth, "realm"), "carrier.test");
    assert_eq!(param(auth, "qop"), "auth");
    assert_eq!(param(auth, "nc"), "00000001");
    let uri = param(auth, "uri");
    assert_eq!(uri, format!("sip:+15551234@127.0.0.1:{}", s.carrier));
    let ha1 = md5_hex("pbx:carrier.test:secret");
    let ha2 = md5_hex(&format!("INVITE:{uri}"));
    let want = md5_hex(&format!(
        "{ha1}:{}:00000001:{}:auth:{ha2}",
        param(auth, "nonce"),
        param(auth, "cnonce")
    ));
    assert_eq!(param(auth, "response"), want);
    let trunks = s.server.handle.trunks();
    let c1 = trunks.get("carrier1").unwrap();
    assert_eq!(
        c1.counters
            .challenges_answered
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(
        eventually(Duration::from_secs(5), || c1.channels() == 0).await,
        "the channel is given back when the call ends"
    );
}

/// A request within the call that the carrier challenges (here the BYE) is sent again
/// with credentials and the dialog's next CSeq (RFC 3261 22.2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenged_bye_is_sent_again_with_credentials() {
    let s = setup("trunk-bye", "secret", 0).await;
    let carrier = sipp::start(
        &s.dir,
        "carrier",
        Path::new("carrier_bye_auth.xml"),
        s.carrier,
        None,
        &[],
    );
    let a = caller(&s, "uac_call.xml", "+15551234", 300);
    a.expect_success(LIMIT).await;
    let seen_c = carrier.expect_success(LIMIT).await;
    let byes: Vec<&SeenMessage> = seen_c
        .iter()
        .filter(|m| !m.sent && m.kind() == "BYE")
        .collect();
    assert_eq!(byes.len(), 2);
    assert!(byes[0].header("Proxy-Authorization").is_none());
    let auth = byes[1].header("Proxy-Authorization").expect("credentials");
    assert_eq!(param(auth, "nonce"), "byen0nc31");
    let seq = |m: &SeenMessage| -> u32 {
        m.header("CSeq")
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(seq(byes[1]), seq(byes[0]) + 1);
    let uri = param(auth, "uri");
    let ha1 = md5_hex("pbx:carrier.test:secret");
    let ha2 = md5_hex(&format!("BYE:{uri}"));
    let want = md5_hex(&format!(
        "{ha1}:byen0nc31:{}:{}:auth:{ha2}",
        param(auth, "nc"),
        param(auth, "cnonce")
    ));
    assert_eq!(param(auth, "response"), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_fail_the_call_without_a_loop() {
    let s = setup("trunk-refused", "wrong", 0).await;
    let carrier = sipp::start(
        &s.dir,
        "carrier",
        Path::new("carrier_invite_refuse.xml"),
        s.carrier,
        None,
        &[],
    );
    let a = caller(&s, &sipp::fail_scenario(&s.dir, 403), "+15551234", 300);
    a.expect_success(LIMIT).await;
    let seen_c = carrier.expect_success(LIMIT).await;
    assert_eq!(
        invites(&seen_c).len(),
        2,
        "one answer to one challenge, no loop"
    );
    let trunks = s.server.handle.trunks();
    let c1 = trunks.get("carrier1").unwrap();
    assert_eq!(
        c1.counters
            .auth_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(c1.channels(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_trunk_fails_at_once_and_the_plan_fails_over() {
    let s = setup("trunk-full", "secret", 1).await;
    // The first call holds carrier1's only channel (answered after its 407).
    let carrier = sipp::start(
        &s.dir,
        "carrier",
        Path::new("carrier_invite_auth.xml"),
        s.carrier,
        None,
        &[],
    );
    let backup = sipp::start(
        &s.dir,
        "backup",
        Path::new("uas_answer.xml"),
        s.backup,
        None,
        &[],
    );
    let first = caller(&s, "uac_call.xml", "+15551111", 4000);
    let trunks = s.server.handle.trunks().clone();
    let c1 = trunks.get("carrier1").unwrap().clone();
    assert!(
        eventually(Duration::from_secs(10), || c1.channels() == 1).await,
        "the first call holds carrier1's channel"
    );
    let second = caller(&s, "uac_call.xml", "+15552222", 300);
    second.expect_success(LIMIT).await;
    let seen_b = backup.expect_success(LIMIT).await;
    let inv = invites(&seen_b);
    assert_eq!(inv.len(), 1);
    assert!(inv[0]
        .first_line()
        .starts_with("INVITE sip:+15552222@127.0.0.1:"));
    // backup presents the caller's From user with P-Preferred-Identity.
    let ppi = inv[0]
        .header("P-Preferred-Identity")
        .expect("P-Preferred-Identity");
    assert!(ppi.starts_with("<sip:caller@127.0.0.1"), "{ppi}");
    first.expect_success(LIMIT).await;
    carrier.expect_success(LIMIT).await;
    assert_eq!(
        c1.counters
            .refused
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        c1.counters
            .answered
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// A trunk whose pings go unanswered is marked down; a call then fails on it at once
/// (503 Trunk Down, source "local") and the dial plan's failover reaches the backup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trunk_whose_pings_stop_is_down_and_the_plan_fails_over() {
    let s = setup_with("trunk-down", "secret", 0, |c| {
        // Timer F (64*T1) of 1.3 s: an unanswered ping is given up quickly.
        c.sip.timers.t1_ms = 20;
        c.trunks.get_mut("carrier1").unwrap().ping_interval_s = 5;
    })
    .await;
    let c1 = s.server.handle.trunks().get("carrier1").unwrap().clone();
    assert!(
        eventually(Duration::from_secs(10), || !c1.is_up()).await,
        "nobody answers carrier1's pings: down"
    );
    let backup = sipp::start(
        &s.dir,
        "backup",
        Path::new("uas_answer.xml"),
        s.backup,
        None,
        &[],
    );
    let a = caller(&s, "uac_call.xml", "+15553333", 300);
    a.expect_success(LIMIT).await;
    let seen_b = backup.expect_success(LIMIT).await;
    assert_eq!(invites(&seen_b).len(), 1, "the backup trunk took the call");
    assert_eq!(
        c1.counters
            .refused
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// A carrier calls the contact a registering trunk registered (`;line=<trunk>`): the call
/// is from that trunk, whatever its source address says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_to_the_registered_contact_is_from_that_trunk() {
    let s = setup_with("trunk-line", "secret", 0, |c| {
        let plan = c.script.path.clone();
        std::fs::write(
            &plan,
            "function on_invite(call)\n  if call.trunk == \"carrier1\" then call:reject(486) \
             else call:reject(480, tostring(call.trunk)) end\nend\n",
        )
        .unwrap();
        c.trunks.get_mut("carrier1").unwrap().register = true;
    })
    .await;
    let text = std::fs::read_to_string(sipp::fail_scenario(&s.dir, 486)).unwrap();
    let path = s.dir.join("uac_line.xml");
    std::fs::write(
        &path,
        text.replace(
            "INVITE sip:[service]@[remote_ip]:[remote_port] SIP/2.0",
            "INVITE sip:[service]@[remote_ip]:[remote_port];line=carrier1 SIP/2.0",
        ),
    )
    .unwrap();
    caller(&s, &path.display().to_string(), "pbx", 300)
        .expect_success(LIMIT)
        .await;
}

async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + limit;
    while std::time::Instant::now() < until {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}
