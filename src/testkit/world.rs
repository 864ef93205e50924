//! One test's world: a fresh server configured like the operator's (its script, call,
//! registrar and hunt-group settings) but on the in-memory network only, with its trunks
//! pointed at simulated carriers, and the simulated phones and trunks the test declares.
//! It runs as a local task; the Lua API talks to it with [`Command`]s.

use crate::config::Config;
use crate::server::ServerHandle;
use crate::simulate::{Behaviour, Device, DeviceSpec, Direction};
use crate::transport::MemoryNetwork;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

pub(super) type Reply = oneshot::Sender<Result<Value, String>>;

/// What a test asks of its world.
pub(super) enum Command {
    Phone {
        name: String,
        spec: Value,
        reply: Reply,
    },
    Trunk {
        name: String,
        spec: Value,
        reply: Reply,
    },
    Call {
        spec: Value,
        reply: Reply,
    },
    Record {
        reply: Reply,
    },
    Metric {
        name: String,
        reply: Reply,
    },
}

/// A world as the runner holds it.
pub(super) struct World {
    commands: mpsc::UnboundedSender<Command>,
    task: tokio::task::JoinHandle<()>,
    ladder: Arc<parking_lot::Mutex<String>>,
    dir: PathBuf,
}

/// Worlds get addresses of their own on the process's memory network (10.A.B.0/24).
static WORLDS: AtomicU32 = AtomicU32::new(1);

impl World {
    /// Prepares a world for the configuration; the server starts with the first phone or
    /// call (after the test has declared its trunks).
    pub(super) async fn start(config: &Config) -> anyhow::Result<World> {
        let n = WORLDS.fetch_add(1, Ordering::Relaxed);
        let net = Ipv4Addr::new(10, 100 + ((n >> 8) & 0x7f) as u8, (n & 0xff) as u8, 0);
        let dir = std::env::temp_dir().join(format!("strowger-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let (config, trunk_addrs) = test_config(config, net, &dir);
        let (commands, rx) = mpsc::unbounded_channel();
        let ladder = Arc::new(parking_lot::Mutex::new(String::new()));
        let state = State {
            config,
            net,
            server: None,
            next_host: 10,
            ladder: ladder.clone(),
            records: dir.join("records.jsonl"),
            trunks: trunk_addrs,
            pending_trunks: Vec::new(),
            devices: BTreeMap::new(),
        };
        let task = tokio::task::spawn_local(state.serve(rx));
        Ok(World {
            commands,
            task,
            ladder,
            dir,
        })
    }

    pub(super) fn commands(&self) -> mpsc::UnboundedSender<Command> {
        self.commands.clone()
    }

    /// The SIP ladder of the test's calls, as the simulated devices saw them.
    pub(super) fn ladder(&self) -> String {
        self.ladder.lock().clone()
    }

    pub(super) async fn stop(self) {
        drop(self.commands);
        let _ = self.task.await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The operator's configuration, moved onto the memory network: the server at `.1`, no
/// sockets but the admin endpoint on a free loopback port, its own store and records,
/// trunks not registering or pinging (and pointed nowhere until the test declares them),
/// no DNS beyond a refused query.
fn test_config(
    base: &Config,
    net: Ipv4Addr,
    dir: &std::path::Path,
) -> (Config, BTreeMap<String, SocketAddr>) {
    let mut c = base.clone();
    let server = SocketAddr::new(host(net, 1).into(), 5060);
    c.sip.listen = vec![format!("memory:{server}")];
    c.http.listen = "127.0.0.1:0".into();
    c.storage.dir = dir.join("data").display().to_string();
    c.registrar.store = crate::registrar::RegistrarStore::Embedded;
    c.registrar.users_file = String::new();
    c.call.records_file = dir.join("records.jsonl").display().to_string();
    c.dns.servers = vec!["127.0.0.1:9".into()];
    c.registrar.keepalive_interval_s = 0;
    let mut addrs = BTreeMap::new();
    for (i, (name, t)) in c.trunks.iter_mut().enumerate() {
        t.register = false;
        t.ping_interval_s = 0;
        // Each trunk its own address, where nothing is until the test declares it: its
        // calls ring out. (A memory-only server reaches every address over memory: no
        // transport parameter.)
        let addr = SocketAddr::new(
            host(net, 200u8.saturating_add(i.min(49) as u8)).into(),
            5060,
        );
        addrs.insert(name.clone(), addr);
        t.uri = format!("sip:{addr}");
        t.inbound = vec![addr.ip().to_string()];
        t.host = String::new();
        t.outbound_proxy = String::new();
        t.tls_cert = String::new();
        t.tls_key = String::new();
    }
    (c, addrs)
}

fn host(net: Ipv4Addr, last: u8) -> Ipv4Addr {
    let o = net.octets();
    Ipv4Addr::new(o[0], o[1], o[2], last)
}

struct State {
    config: Config,
    net: Ipv4Addr,
    server: Option<ServerHandle>,
    next_host: u8,
    ladder: Arc<parking_lot::Mutex<String>>,
    records: PathBuf,
    /// Every trunk's address (where its simulated carrier is, once declared).
    trunks: BTreeMap<String, SocketAddr>,
    /// Trunk devices waiting for the server to start (they need its address only).
    pending_trunks: Vec<(String, Value)>,
    /// Every device of the test, by name.
    devices: BTreeMap<String, Device>,
}

impl State {
    async fn serve(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        while let Some(cmd) = rx.recv().await {
            match cmd {
                Command::Phone { name, spec, reply } => {
                    let r = self.phone(name, spec).await;
                    let _ = reply.send(r);
                }
                Command::Trunk { name, spec, reply } => {
                    let r = self.trunk(name, spec).await;
                    let _ = reply.send(r);
                }
                Command::Call { spec, reply } => {
                    let r = self.call(spec).await;
                    let _ = reply.send(r);
                }
                Command::Record { reply } => {
                    let _ = reply.send(self.record());
                }
                Command::Metric { name, reply } => {
                    let r = self.metric(&name).await;
                    let _ = reply.send(r);
                }
            }
        }
        self.devices.clear();
        if let Some(server) = self.server.take() {
            server.shutdown(Duration::from_millis(100)).await;
        }
    }

    fn server_addr(&self) -> SocketAddr {
        SocketAddr::new(host(self.net, 1).into(), 5060)
    }

    fn fresh_addr(&mut self) -> Result<SocketAddr, String> {
        if self.next_host >= 200 {
            return Err("too many phones in one test (at most 190)".into());
        }
        let a = SocketAddr::new(host(self.net, self.next_host).into(), 5060);
        self.next_host += 1;
        Ok(a)
    }

    /// Starts the server if it is not running yet.
    async fn server(&mut self) -> Result<&ServerHandle, String> {
        if self.server.is_none() {
            let server = crate::server::start(&self.config)
                .await
                .map_err(|e| format!("the server did not start: {e:#}"))?;
            self.server = Some(server);
            for (name, spec) in std::mem::take(&mut self.pending_trunks) {
                let addr = self.trunks[&name];
                let spec = device_spec(&name, &spec, self.server_addr(), true)?.at(addr);
                self.add_device(name, spec).await?;
            }
        }
        Ok(self.server.as_ref().expect("started above"))
    }

    async fn add_device(&mut self, name: String, spec: DeviceSpec) -> Result<(), String> {
        if self.devices.contains_key(&name) {
            return Err(format!("there is already a phone or trunk named {name:?}"));
        }
        let device = Device::start(&MemoryNetwork::global(), spec)
            .await
            .map_err(|e| format!("{name}: {e}"))?;
        self.devices.insert(name, device);
        Ok(())
    }

    async fn trunk(&mut self, name: String, spec: Value) -> Result<Value, String> {
        if self.server.is_some() {
            return Err(format!(
                "trunk({name:?}) after a phone or a call: declare trunks first (the server starts with the first phone or call)"
            ));
        }
        // A trunk the configuration lacks is declared for the test (the shipped
        // configuration has none; a plan written for `carrier` can still be tested).
        let next = SocketAddr::new(
            host(
                self.net,
                200u8.saturating_add(self.trunks.len().min(49) as u8),
            )
            .into(),
            5060,
        );
        let addr = *self.trunks.entry(name.clone()).or_insert(next);
        let t = self.config.trunks.entry(name.clone()).or_default();
        t.uri = format!("sip:{addr}");
        // Calls from the simulated carrier come from its address: the trunk's `inbound`.
        t.inbound = vec![addr.ip().to_string()];
        // Checked now, started with the server.
        device_spec(&name, &spec, addr, true)?;
        if self.pending_trunks.iter().any(|(n, _)| *n == name) {
            return Err(format!("trunk({name:?}) twice"));
        }
        self.pending_trunks.push((name.clone(), spec));
        Ok(json!(name))
    }

    async fn phone(&mut self, name: String, spec: Value) -> Result<Value, String> {
        self.server().await?;
        let mut d = device_spec(&name, &spec, self.server_addr(), false)?;
        d.domain = self.config.sip.domain.clone();
        let d = match spec.get("at").and_then(Value::as_str) {
            Some(at) => d.at(at
                .parse()
                .map_err(|_| format!("{name}: at = {at:?} is not IP:PORT"))?),
            None => d.at(self.fresh_addr()?),
        };
        self.add_device(name.clone(), d).await?;
        Ok(json!(name))
    }

    /// `call{from=, to=, headers=, hold=}`: the call placed, answered or not, then (when
    /// answered) held `hold` seconds (default 1) and hung up by the caller unless the far
    /// end did first. Its result says who was rung, in order, and who answered.
    async fn call(&mut self, spec: Value) -> Result<Value, String> {
        self.server().await?;
        let from = spec
            .get("from")
            .and_then(Value::as_str)
            .ok_or("call{...} needs from = \"<phone or trunk name>\"")?
            .to_string();
        let to = match spec.get("to") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err("call{...} needs to = \"<number or URI>\"".into()),
        };
        let mut headers = Vec::new();
        if let Some(h) = spec.get("headers").and_then(Value::as_object) {
            for (k, v) in h {
                let v = v
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string());
                headers.push((k.clone(), v));
            }
        }
        let hold = spec
            .get("hold")
            .and_then(Value::as_f64)
            .unwrap_or(1.0)
            .max(0.0);
        let Some(caller) = self.devices.get(&from) else {
            return Err(format!("no phone or trunk named {from:?}"));
        };
        let caller = caller.clone();
        let before: BTreeMap<String, usize> = self
            .devices
            .iter()
            .map(|(n, d)| (n.clone(), d.incoming().len()))
            .collect();
        let outcome = caller
            .call(&to, &headers)
            .await
            .map_err(|e| format!("call from {from} to {to}: {e}"))?;
        if outcome.answered() {
            tokio::time::sleep(Duration::from_secs_f64(hold)).await;
            // The far end may have hung up already: then there is nothing to end.
            let _ = outcome.call.hangup().await;
        }
        // Let the last requests and answers cross.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut rung: Vec<(u64, String)> = Vec::new();
        let mut invites = serde_json::Map::new();
        let mut answered: Vec<(u64, String)> = Vec::new();
        for (name, device) in &self.devices {
            let new: Vec<_> = device
                .incoming()
                .into_iter()
                .skip(before.get(name).copied().unwrap_or(0))
                .collect();
            if new.is_empty() {
                continue;
            }
            // Which device was rung first: the order its first INVITE of this call arrived
            // in among all devices' messages (on a paused clock they share an instant).
            let first = device
                .log()
                .iter()
                .find(|e| e.direction == Direction::Received && e.call_id() == new[0].call_id)
                .map_or(u64::MAX, |e| e.seq);
            rung.push((first, name.clone()));
            if new
                .iter()
                .any(|c| c.final_status.is_some_and(|s| (200..300).contains(&s)))
            {
                // The first to answer (a transfer's target answers later).
                answered.push((first, name.clone()));
            }
            let list: Vec<Value> = new
                .iter()
                .map(|c| {
                    let headers: serde_json::Map<String, Value> = c
                        .headers
                        .iter()
                        .map(|(k, v)| (k.clone(), json!(v)))
                        .collect();
                    json!({
                        "ruri": c.ruri,
                        "number": c.number,
                        "from": c.from,
                        "to": c.to,
                        "headers": headers,
                        "status": c.final_status,
                    })
                })
                .collect();
            invites.insert(name.clone(), Value::Array(list));
        }
        rung.sort();
        answered.sort();
        let answered_by = answered.first().map_or(Value::Null, |(_, n)| json!(n));
        let devices: Vec<&Device> = self.devices.values().collect();
        *self.ladder.lock() = crate::simulate::ladder(&devices);
        Ok(json!({
            "status": outcome.status,
            "reason": outcome.reason,
            "answered": outcome.answered(),
            "answered_by": answered_by,
            "rung": rung.into_iter().map(|(_, n)| n).collect::<Vec<_>>(),
            "invites": invites,
            "provisional": outcome.provisional,
            "seconds": outcome.elapsed.as_secs_f64(),
        }))
    }

    /// The last call record the server wrote (`call.records_file`), as a table.
    fn record(&self) -> Result<Value, String> {
        let text = std::fs::read_to_string(&self.records).unwrap_or_default();
        let Some(last) = text.lines().rev().find(|l| !l.trim().is_empty()) else {
            return Err("no call record yet (a record is written when a call ends)".into());
        };
        serde_json::from_str(last).map_err(|e| format!("call record: {e}"))
    }

    /// A metric's value: `name` or `name{label="value",...}` as in the text format; the
    /// sum over all series matching when labels are left out.
    async fn metric(&mut self, name: &str) -> Result<Value, String> {
        let addr = self.server().await?.admin_addr();
        let text = crate::admin::get(addr, "/metrics")
            .await
            .map_err(|e| format!("metrics: {e}"))?;
        let (want_name, want_labels) = match name.split_once('{') {
            Some((n, rest)) => (n, Some(rest.trim_end_matches('}'))),
            None => (name, None),
        };
        let mut sum = 0.0;
        let mut found = false;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (n, labels) = match series.split_once('{') {
                Some((n, l)) => (n, l.trim_end_matches('}')),
                None => (series, ""),
            };
            if n != want_name {
                continue;
            }
            if let Some(want) = want_labels {
                let have: Vec<&str> = labels.split(',').collect();
                if !want.split(',').all(|w| have.contains(&w.trim())) {
                    continue;
                }
            }
            if let Ok(v) = value.parse::<f64>() {
                sum += v;
                found = true;
            }
        }
        if !found {
            return Err(format!("no metric {name} (see GET /metrics)"));
        }
        Ok(json!(sum))
    }
}

/// `strowger route-test`: one call from `from` to `to` through the configured plan, where
/// every target the plan dials is answered by one simulated device (the memory network's
/// fallback) behaving as `target` says. Returns the report.
pub(super) async fn route(
    config: &Config,
    from: &str,
    to: &str,
    headers: &[(String, String)],
    target: &Value,
) -> Result<String, String> {
    let n = WORLDS.fetch_add(1, Ordering::Relaxed);
    let net = Ipv4Addr::new(10, 100 + ((n >> 8) & 0x7f) as u8, (n & 0xff) as u8, 0);
    let dir = std::env::temp_dir().join(format!("strowger-route-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let (config, trunk_addrs) = test_config(config, net, &dir);
    let mut state = State {
        config,
        net,
        server: None,
        next_host: 10,
        ladder: Arc::default(),
        records: dir.join("records.jsonl"),
        trunks: trunk_addrs,
        pending_trunks: Vec::new(),
        devices: BTreeMap::new(),
    };
    let report = state.route(from, to, headers, target).await;
    state.devices.clear();
    if let Some(server) = state.server.take() {
        server.shutdown(Duration::from_millis(100)).await;
    }
    MemoryNetwork::global().set_fallback(None);
    let _ = std::fs::remove_dir_all(&dir);
    report
}

impl State {
    async fn route(
        &mut self,
        from: &str,
        to: &str,
        headers: &[(String, String)],
        target: &Value,
    ) -> Result<String, String> {
        let server = self.server_addr();
        self.server().await?;
        let uri = crate::sip::Uri::parse(from)
            .map_err(|e| format!("--from {from:?}: not a SIP URI: {e}"))?;
        let user = uri.user.clone().unwrap_or_else(|| "caller".into());
        let answer = self.fresh_addr()?;
        let targets = device_spec("targets", target, server, true)?.at(answer);
        self.add_device("targets".into(), targets).await?;
        MemoryNetwork::global().set_fallback(Some(answer));
        let caller = DeviceSpec::phone(&user, server)
            .register(false)
            .named("caller")
            .domain(&uri.host.to_string())
            .at(self.fresh_addr()?);
        self.add_device("caller".into(), caller).await?;
        let outcome = self.devices["caller"]
            .call(to, headers)
            .await
            .map_err(|e| format!("the call: {e}"))?;
        if outcome.answered() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = outcome.call.hangup().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let by_addr: BTreeMap<SocketAddr, &String> =
            self.trunks.iter().map(|(n, a)| (*a, n)).collect();
        let mut out = format!("route-test: {from} -> {to}\n");
        let dialled = self.devices["targets"].incoming();
        if dialled.is_empty() {
            out.push_str("  the dial plan dialled nothing\n");
        }
        for (i, c) in dialled.iter().enumerate() {
            let trunk = crate::sip::Uri::parse(&c.ruri)
                .ok()
                .and_then(|u| {
                    let ip = u.host.ip()?;
                    by_addr
                        .get(&SocketAddr::new(ip, u.port.unwrap_or(5060)))
                        .copied()
                })
                .map(|t| format!(" (trunk {t})"))
                .unwrap_or_default();
            let status = c
                .final_status
                .map_or("no final answer".to_string(), |s| s.to_string());
            out.push_str(&format!(
                "  dialled {}: {}{trunk} -> {status}\n",
                i + 1,
                c.ruri
            ));
        }
        out.push_str(&format!(
            "  the caller got: {} {} after {:.1} s\n",
            outcome.status,
            outcome.reason,
            outcome.elapsed.as_secs_f64()
        ));
        if let Ok(record) = self.record() {
            for key in ["route", "hangup_by", "final_status"] {
                if let Some(v) = record.get(key).filter(|v| !v.is_null()) {
                    out.push_str(&format!("  record {key}: {v}\n"));
                }
            }
        }
        let devices: Vec<&Device> = self.devices.values().collect();
        out.push_str("  the calls:\n");
        for line in crate::simulate::ladder(&devices).lines() {
            out.push_str("    ");
            out.push_str(line);
            out.push('\n');
        }
        Ok(out)
    }
}

/// A device from a test's options: `register` (phones: true), `answer_after` (seconds),
/// `busy`, `ring`, `reject` (a status), `hangup_after` (seconds after answering),
/// `refer` (a target to transfer the caller to once answered).
fn device_spec(
    name: &str,
    spec: &Value,
    server: SocketAddr,
    trunk: bool,
) -> Result<DeviceSpec, String> {
    const KNOWN: &[&str] = &[
        "register",
        "answer_after",
        "busy",
        "ring",
        "reject",
        "hangup_after",
        "refer",
        "at",
    ];
    if let Some(map) = spec.as_object() {
        if let Some(k) = map.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            return Err(format!(
                "{name}: unknown option {k:?} (known: {})",
                KNOWN.join(", ")
            ));
        }
    } else if !spec.is_null() {
        return Err(format!("{name}: options must be a table"));
    }
    let secs = |key: &str| -> Result<Option<Duration>, String> {
        match spec.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|s| *s >= 0.0 && s.is_finite())
                .map(|s| Some(Duration::from_secs_f64(s)))
                .ok_or_else(|| format!("{name}: {key} must be a number of seconds")),
        }
    };
    let flag = |key: &str| spec.get(key).and_then(Value::as_bool).unwrap_or(false);
    let after = secs("answer_after")?.unwrap_or(Duration::ZERO);
    let behaviour = if flag("busy") {
        Behaviour::Busy
    } else if flag("ring") {
        Behaviour::Ring
    } else if let Some(v) = spec.get("reject") {
        let status = v
            .as_u64()
            .filter(|s| (300..700).contains(s))
            .ok_or_else(|| format!("{name}: reject must be a final status (300-699)"))?;
        Behaviour::Reject(status as u16)
    } else if let Some(hold) = secs("hangup_after")? {
        Behaviour::AnswerThenHangUp { after, hold }
    } else if let Some(target) = spec.get("refer").and_then(Value::as_str) {
        Behaviour::AnswerThenRefer {
            after,
            target: target.to_string(),
        }
    } else {
        Behaviour::Answer { after }
    };
    let d = if trunk {
        DeviceSpec::trunk(name, server)
    } else {
        DeviceSpec::phone(name, server).register(
            spec.get("register")
                .and_then(Value::as_bool)
                .unwrap_or(true),
        )
    };
    Ok(d.named(name).on_invite(behaviour))
}
