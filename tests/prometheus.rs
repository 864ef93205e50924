//! The dashboards and alert rules against a real Prometheus: it scrapes an in-process server
//! and evaluates every Grafana panel query and every alert expression, so a typo in a metric
//! name or in PromQL fails here instead of showing an empty panel in production; promtool then
//! checks the rules file and runs the alerts' unit tests.
//!
//! Needs the `prometheus` binary (Debian package `prometheus`); the test command installs it,
//! and without it the test says so and passes, since the rest of the suite must not depend on it.

mod common;

use common::{request, start_with, test_config, unique, UdpPeer, WAIT};
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Metrics the server exposes. Overview panels made only of these must show data.
const METRICS_NOW: &[&str] = &[
    "strowger_calls_active",
    "strowger_calls_total",
    "strowger_calls_answered_total",
    "strowger_calls_failed_total",
    "strowger_call_setup_seconds_bucket",
    "strowger_call_setup_seconds_sum",
    "strowger_call_setup_seconds_count",
    "strowger_script_errors_total",
    "strowger_script_time_limits_total",
    "strowger_script_vms_abandoned_total",
    "strowger_script_memory_bytes",
    "strowger_sip_malformed_total",
    "strowger_sip_requests_total",
    "strowger_sip_responses_total",
    "strowger_transactions",
    "strowger_transaction_timeouts_total",
    "strowger_auth_failures_total",
    "strowger_registrar_bindings",
    "strowger_registrar_events_total",
    "strowger_process_cpu_seconds_total",
    "strowger_process_resident_memory_bytes",
    "strowger_process_open_fds",
    "strowger_admin_unauthorized_total",
    "strowger_call_duration_seconds_bucket",
    "strowger_dial_outcomes_total",
    "strowger_route_calls_total",
    "strowger_script_hook_duration_seconds_bucket",
    "strowger_script_hook_duration_seconds_count",
    "strowger_transaction_retransmissions_total",
    // Protection (issue 15); the pike series exist only with sip.pike_requests set.
    "strowger_overload_refused_total",
    "strowger_overload_refused_ratio",
    "strowger_overload_queue_delay_seconds",
    "strowger_transactions_refused_total",
    "strowger_pike_dropped_total",
    "strowger_pike_blocks_total",
    "strowger_tcp_closed_total",
    "strowger_udp_receive_drops_total",
    "strowger_keepalive_ended_total",
    // Per transport (dashboards/transport.json).
    "strowger_transport_connections",
    "strowger_transport_messages_total",
    "strowger_transport_handshakes_failed_total",
    "strowger_auth_table_full_total",
    "strowger_register_results_total",
    "strowger_transfers_total",
    // Session timers (issue 16, RFC 4028).
    "strowger_session_timer_expiries_total",
    "strowger_session_timer_too_brief_total",
    "strowger_presence_subscriptions",
    "strowger_presence_notifies_total",
    "strowger_presence_publish_total",
    "strowger_messages_total",
    // Hunt groups (dashboards/huntgroups.json).
    "strowger_huntgroup_waiting",
    "strowger_huntgroup_longest_wait_seconds",
    "strowger_huntgroup_answered_total",
    "strowger_huntgroup_abandoned_total",
    "strowger_huntgroup_overflowed_total",
    "strowger_huntgroup_agents",
    "strowger_huntgroup_answer_seconds_bucket",
    "strowger_huntgroup_answer_seconds_count",
    // Trunks (issue 16); the series exist with [trunks.*] configured.
    "strowger_trunk_registered",
    "strowger_trunk_up",
    "strowger_trunk_channels",
    "strowger_trunk_calls_total",
    "strowger_trunk_auth_failures_total",
    "strowger_trunk_registrations_total",
    // Cluster (issue 18, dashboards/cluster.json); the series exist with cluster.enabled.
    "strowger_cluster_nodes_alive",
    "strowger_cluster_call_records",
    "strowger_cluster_calls_taken_over_total",
    "strowger_cluster_nodes_taken_over_total",
    "strowger_cluster_record_writes_total",
    "strowger_cluster_record_errors_total",
    "strowger_cluster_lease_failures_total",
];

/// Metrics a query may name that the server does not expose yet (none today).
const METRICS_COMING: &[&str] = &[];

const DASHBOARDS: &[&str] = &[
    "overview.json",
    "registrations.json",
    "script.json",
    "transactions.json",
    "huntgroups.json",
    "trunks.json",
    "transport.json",
    "cluster.json",
];

/// Kills the Prometheus child by its PID however the test ends, so no scraper outlives it.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl Prometheus {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody holds right now; Prometheus takes it by number, so the listener is released.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn start_prometheus(dir: &Path, target: SocketAddr) -> Prometheus {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: strowger\n    static_configs:\n      \
             - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = dir.join("prometheus.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address={addr}"))
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("start prometheus");
    Prometheus { child, addr, log }
}

/// Percent-encodes a query-string value: everything but RFC 3986 unreserved characters.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query; the API's `data`, or its error (Prometheus answers a bad query with 400).
async fn query(prom: SocketAddr, expr: &str) -> Result<Value, String> {
    let body = strowger::admin::get(prom, &format!("/api/v1/query?query={}", encode(expr)))
        .await
        .map_err(|e| e.to_string())?;
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if v["status"] != "success" {
        return Err(body);
    }
    Ok(v["data"].clone())
}

/// Grafana's variables as Prometheus cannot read them: `$__rate_interval`, `$__range`... become
/// a duration, and dashboard variables (`$instance`, used as label regexes) match everything.
fn expand(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, tail) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').expect("closed ${...}");
            (&braced[..end], &braced[end + 1..])
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], &after[end..])
        };
        assert!(!name.is_empty(), "a lone $ in {expr}");
        out.push_str(if name.starts_with("__") { "1m" } else { ".*" });
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// The Strowger metric names an expression reads (`_bucket` and the like included as written).
fn metrics_in(expr: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("strowger_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        found.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    found
}

/// (panel title, expr) of every query target, row-nested panels included, checking on the way
/// that each panel and target reads the `datasource` variable so the import works anywhere.
fn panel_queries(file: &str, v: &Value, out: &mut Vec<(String, String)>) {
    let want_ds = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});
    if let Some(targets) = v.get("targets").and_then(Value::as_array) {
        let title = v["title"].as_str().unwrap_or("?").to_string();
        assert_eq!(v["datasource"], want_ds, "{file}: panel {title}");
        for t in targets {
            assert_eq!(t["datasource"], want_ds, "{file}: panel {title}");
            let expr = t["expr"].as_str().expect("target has expr");
            out.push((title.clone(), expr.to_string()));
        }
    }
    match v {
        Value::Array(items) => items.iter().for_each(|i| panel_queries(file, i, out)),
        Value::Object(map) => map.values().for_each(|i| panel_queries(file, i, out)),
        _ => {}
    }
}

/// The `expr` of every rule in a rules file. No YAML crate is a dependency, and the file keeps
/// to two forms: `expr: <one line>` and `expr: |` with an indented block.
fn rule_exprs(yaml: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let Some((indent, value)) = line.split_once("expr:") else {
            continue;
        };
        if !indent.trim().is_empty() {
            continue;
        }
        let value = value.trim();
        if value == "|" {
            let mut block = Vec::new();
            while let Some(next) = lines.peek() {
                let depth = next.len() - next.trim_start().len();
                if !next.trim().is_empty() && depth <= indent.len() {
                    break;
                }
                block.push(next.trim());
                lines.next();
            }
            exprs.push(block.join("\n"));
        } else {
            assert!(
                !value.starts_with(['>', '|', '"', '\'']),
                "rule_exprs reads plain or `|` exprs only: {line}"
            );
            exprs.push(value.to_string());
        }
    }
    exprs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_alerts_evaluate_against_a_scraping_prometheus() {
    if Command::new("prometheus")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!("SKIPPED: no `prometheus` binary (apt-get install prometheus)");
        return;
    }
    let dashboards = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    // A plan that sends every call to a SIPp callee, so that calls are answered, timed
    // and hung up (the overview's calls, ASR and setup-time panels get real data).
    let work = common::sipp::workdir("prom");
    let callee_port = common::sipp::free_udp_port();
    let plan = work.join("plan.lua");
    std::fs::write(
        &plan,
        format!(
            "function on_invite(call) call:set_route(\"pstn\") \
             call:dial(\"sip:callee@127.0.0.1:{callee_port}\") end\n"
        ),
    )
    .unwrap();
    let mut config = test_config();
    config.call.routes = vec!["pstn".into()];
    config.script.path = plan.display().to_string();
    // A hunt group, so that the hunt-group board's series exist (all start at zero).
    config.huntgroups.insert(
        "support".into(),
        strowger::huntgroup::HuntGroupConfig {
            members: vec![format!("sip:agent@127.0.0.1:{callee_port}")],
            ..Default::default()
        },
    );
    // A trunk (neither registering nor pinged: no traffic), so that its series exist.
    config.trunks.insert(
        "carrier1".into(),
        strowger::trunk::TrunkConfig {
            uri: "sip:127.0.0.1:9".into(),
            ..Default::default()
        },
    );
    let s = start_with(config).await;
    let text = strowger::admin::get(s.handle.admin_addr(), "/metrics")
        .await
        .unwrap();
    for m in METRICS_NOW
        .iter()
        .filter(|m| m.starts_with("strowger_trunk_"))
    {
        assert!(text.contains(&format!("\n{m}{{")), "{m} exposed:\n{text}");
    }
    let dir = tempfile::tempdir().unwrap();
    let prom = start_prometheus(dir.path(), s.handle.admin_addr());

    // Traffic so the counters move: OPTIONS, REGISTERs and malformed input.
    let peer = UdpPeer::bind("127.0.0.1").await;
    for _ in 0..3 {
        let msg = request(
            "OPTIONS",
            "sip:strowger.test",
            peer.addr,
            "UDP",
            &unique("opt"),
            "",
            "",
        );
        peer.send(s.udp, msg.as_bytes()).await;
        assert!(peer.recv_final(WAIT).await.is_some(), "OPTIONS answered");
    }
    // Two phones registering with SIPp (bindings, registrar events, REGISTER results).
    for phone in ["alice", "bob"] {
        common::sipp::start(
            &work,
            &format!("phone-{phone}"),
            Path::new("register.xml"),
            common::sipp::free_udp_port(),
            Some(s.udp),
            &["-s", phone],
        )
        .expect_success(Duration::from_secs(30))
        .await;
    }
    assert_eq!(s.handle.registrar().count(), 2, "both phones registered");
    peer.send(s.udp, b"NOT SIP AT ALL\r\n\r\n").await;
    // Three calls with SIPp as caller and callee.
    let callee = common::sipp::start(
        &work,
        "callee",
        Path::new("uas_answer.xml"),
        callee_port,
        None,
        &["-m", "3"],
    );
    let caller = common::sipp::start(
        &work,
        "caller",
        Path::new("uac_call.xml"),
        common::sipp::free_udp_port(),
        Some(s.udp),
        &["-s", "bob", "-d", "100", "-m", "3"],
    );
    caller.expect_success(Duration::from_secs(30)).await;
    callee.expect_success(Duration::from_secs(30)).await;

    // Prometheus up and the server scraped: `up` is 1 only after a successful scrape.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(data) = query(prom.addr, "up{job=\"strowger\"}").await {
            if data["result"][0]["value"][1] == "1" {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus did not scrape {} within 20 s; its log:\n{}",
            s.handle.admin_addr(),
            prom.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let now: BTreeSet<String> = METRICS_NOW.iter().map(|m| m.to_string()).collect();
    let known: BTreeSet<String> = METRICS_NOW
        .iter()
        .chain(METRICS_COMING)
        .map(|m| m.to_string())
        .collect();
    let mut must_show = Vec::new();
    let mut checked = 0;
    for file in DASHBOARDS {
        let text = std::fs::read_to_string(dashboards.join(file)).unwrap();
        let dash: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        let vars = dash["templating"]["list"].as_array().expect("templating");
        assert!(
            vars.iter().any(|v| v["name"] == "datasource"
                && v["type"] == "datasource"
                && v["query"] == "prometheus"),
            "{file}: a `datasource` variable of type datasource"
        );
        let mut queries = Vec::new();
        panel_queries(file, &dash, &mut queries);
        assert!(!queries.is_empty(), "{file} has queries");
        for (title, expr) in queries {
            let q = expand(&expr);
            if let Err(e) = query(prom.addr, &q).await {
                panic!("{file}: panel {title:?}: {q}\n{e}");
            }
            checked += 1;
            let used = metrics_in(&expr);
            assert!(
                used.is_subset(&known),
                "{file}: panel {title:?} reads an unknown metric: {expr}"
            );
            if *file == "overview.json" && !used.is_empty() && used.is_subset(&now) {
                must_show.push((title, q));
            }
        }
    }
    assert!(!must_show.is_empty(), "overview panels on today's metrics");

    // Rates need two samples in their window, so data may lag `up` by a scrape or two.
    for (title, q) in &must_show {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let data = query(prom.addr, q).await.unwrap();
            if data["result"].as_array().is_some_and(|r| !r.is_empty()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "overview panel {title:?} stayed empty: {q}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    let rules = std::fs::read_to_string(dashboards.join("alerts.yml")).unwrap();
    let exprs = rule_exprs(&rules);
    assert_eq!(
        exprs.len(),
        rules.matches("- alert:").count(),
        "one expr per alert"
    );
    for expr in exprs {
        assert!(
            metrics_in(&expr).is_subset(&known),
            "alerts.yml reads an unknown metric: {expr}"
        );
        if let Err(e) = query(prom.addr, &expr).await {
            panic!("alerts.yml: {expr}\n{e}");
        }
        checked += 1;
    }
    // promtool ships with prometheus: the rules file as Prometheus loads it, and the alerts'
    // unit tests (dashboards/alerts_test.yml), which check when each alert fires.
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let run = tokio::process::Command::new("promtool")
            .args(args)
            .current_dir(&dashboards)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .unwrap_or_else(|_| panic!("promtool {args:?} took over 60 s"))
            .expect("run promtool (package prometheus)");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!(
        "{checked} expressions evaluated, {} overview panels with data",
        must_show.len()
    );
}
