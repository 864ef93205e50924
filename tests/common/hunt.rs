//! Helpers of the hunt-group tests: SIPp agents and callers with free choice of `-m`,
//! `-l` and `-d`, who answered each call (from the caller's log), and the admin API.
#![allow(dead_code)]

use super::sipp::SeenMessage;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::Child;

/// A SIPp process started by a test, killed (by its own handle) when dropped.
pub struct Peer {
    child: Child,
    pub name: String,
    pub messages: PathBuf,
    pub port: u16,
}

/// Starts SIPp: scenario under tests/sipp, local UDP `port`, `remote` for a caller.
pub fn sipp(
    dir: &Path,
    name: &str,
    scenario: &str,
    port: u16,
    remote: Option<SocketAddr>,
    args: &[&str],
) -> Peer {
    let (child, messages) = super::sipp::spawn(super::sipp::Run {
        dir,
        name,
        scenario: Path::new(scenario),
        port,
        remote,
        timeout: "60s",
        args,
    });
    Peer {
        child,
        name: name.to_owned(),
        messages,
        port,
    }
}

/// An agent answering up to 10,000 calls after `delay_ms` of ringing, on a free port.
pub fn agent(dir: &Path, name: &str, delay_ms: u64) -> Peer {
    let port = super::sipp::free_udp_port();
    sipp(
        dir,
        name,
        "hunt_agent.xml",
        port,
        None,
        &["-m", "10000", "-d", &delay_ms.to_string()],
    )
}

impl Peer {
    pub fn uri(&self) -> String {
        format!("sip:agent@127.0.0.1:{}", self.port)
    }

    /// Waits (bounded) for SIPp to finish; panics with its output when it failed.
    pub async fn success(self, limit: Duration) -> Vec<SeenMessage> {
        super::sipp::finish(self.child, &self.name, &self.messages, limit).await
    }
}

/// Runs `calls` calls one after the other (`-l 1`) from a SIPp caller to `service` and
/// returns, in order, the port of the agent that answered each (from the 200's SDP).
pub async fn sequential_calls(
    dir: &Path,
    name: &str,
    server: SocketAddr,
    service: &str,
    calls: u32,
    hold_ms: u64,
) -> Vec<u16> {
    let caller = sipp(
        dir,
        name,
        "hunt_caller.xml",
        super::sipp::free_udp_port(),
        Some(server),
        &[
            "-s",
            service,
            "-m",
            &calls.to_string(),
            "-l",
            "1",
            "-r",
            "50",
            "-d",
            &hold_ms.to_string(),
        ],
    );
    let seen = caller
        .success(Duration::from_secs(20 + u64::from(calls)))
        .await;
    answered_by(&seen)
}

/// The agent port named in each 200 with SDP a caller received.
pub fn answered_by(seen: &[SeenMessage]) -> Vec<u16> {
    seen.iter()
        .filter(|m| !m.sent && m.kind() == "200")
        .filter_map(|m| {
            let at = m.text.find("s=agent-")? + "s=agent-".len();
            let digits: String = m.text[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .collect()
}

/// `GET /huntgroups` as JSON.
pub async fn groups(admin: SocketAddr) -> serde_json::Value {
    let text = strowger::admin::get(admin, "/huntgroups")
        .await
        .expect("GET /huntgroups");
    serde_json::from_str(&text).expect("JSON")
}

/// One group of `GET /huntgroups`.
pub async fn group(admin: SocketAddr, name: &str) -> serde_json::Value {
    let all = groups(admin).await;
    all.as_array()
        .and_then(|a| a.iter().find(|g| g["name"] == name).cloned())
        .unwrap_or_else(|| panic!("group {name} in {all}"))
}

/// The state of `agent` in `group` per `GET /huntgroups`.
pub async fn agent_state(admin: SocketAddr, group_name: &str, agent: &str) -> String {
    let g = group(admin, group_name).await;
    g["agents"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["agent"] == agent))
        .and_then(|x| x["state"].as_str())
        .unwrap_or_else(|| panic!("agent {agent} in {g}"))
        .to_owned()
}

/// `POST /huntgroups/agent` (raw HTTP/1.1, the body is JSON): status and body.
pub async fn set_agent(admin: SocketAddr, agent: &str, state: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = serde_json::json!({ "agent": agent, "state": state }).to_string();
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    let req = format!(
        "POST /huntgroups/agent HTTP/1.1\r\nHost: {admin}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .expect("admin answers")
        .unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

/// Calls an agent was offered while it already had another: from the agent's log, each
/// INVITE of a new Call-ID that arrived before the BYE of a call it had not finished.
pub fn overlapping_calls(seen: &[SeenMessage]) -> usize {
    let mut open: Vec<String> = Vec::new();
    let mut overlaps = 0;
    for m in seen.iter().filter(|m| !m.sent) {
        let Some(id) = m.header("Call-ID").map(str::to_owned) else {
            continue;
        };
        match m.kind().as_str() {
            "INVITE" if !open.contains(&id) => {
                if !open.is_empty() {
                    overlaps += 1;
                }
                open.push(id);
            }
            "BYE" | "CANCEL" => open.retain(|o| *o != id),
            _ => {}
        }
    }
    overlaps
}

/// The From URI of each call offered to an agent (one per Call-ID), in order.
pub fn offered_from(seen: &[SeenMessage]) -> Vec<String> {
    let mut ids = Vec::new();
    let mut froms = Vec::new();
    for m in seen.iter().filter(|m| !m.sent && m.kind() == "INVITE") {
        let id = m.header("Call-ID").unwrap_or_default().to_owned();
        if !ids.contains(&id) {
            ids.push(id);
            froms.push(m.header("From").unwrap_or_default().to_owned());
        }
    }
    froms
}

/// A TCP relay to 127.0.0.1:`to` on a port of its own: a node given its address reaches
/// Redis until [`Relay::cut`], after which the node is, for the cluster, gone.
pub struct Relay {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(to: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            // Dropped with the task: every relayed connection is closed by `cut`.
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut a, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut b) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                });
            }
        });
        Relay { port, task }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Closes the listener and every relayed connection.
    pub async fn cut(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}
