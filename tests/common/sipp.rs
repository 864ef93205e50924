//! Running SIPp peers around a test server and reading what each of them saw.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::process::{Child, Command};

/// A free UDP port on 127.0.0.1 for a SIPp peer (the server dials it, so it must be known
/// before SIPp starts).
pub fn free_udp_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    s.local_addr().unwrap().port()
}

pub struct Sipp {
    child: Child,
    pub name: String,
    pub messages: PathBuf,
}

pub fn workdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(super::unique(&format!("strowger-{tag}")));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// How a test's SIPp runs: the scenario, where it logs, how long it may take.
pub struct Run<'a> {
    pub dir: &'a Path,
    pub name: &'a str,
    /// A file under tests/sipp, or a path.
    pub scenario: &'a Path,
    pub port: u16,
    /// The server, for a caller; None for a callee.
    pub remote: Option<SocketAddr>,
    /// `-timeout` of the whole run, e.g. "30s".
    pub timeout: &'a str,
    pub args: &'a [&'a str],
}

/// Spawns SIPp (UDP, messages traced to `<dir>/<name>.messages.log`, errors to
/// `<name>.errors.log`, killed with its handle); returns the child and the messages file.
pub fn spawn(run: Run) -> (Child, PathBuf) {
    let scenario = if run.scenario.is_absolute() {
        run.scenario.to_path_buf()
    } else {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/sipp")
            .join(run.scenario)
    };
    let messages = run.dir.join(format!("{}.messages.log", run.name));
    let mut cmd = Command::new("sipp");
    cmd.arg("-sf")
        .arg(&scenario)
        .args(["-i", "127.0.0.1", "-p", &run.port.to_string(), "-t", "u1"])
        .args(["-nostdin", "-trace_msg", "-message_file"])
        .arg(&messages)
        .args(["-trace_err", "-error_file"])
        .arg(run.dir.join(format!("{}.errors.log", run.name)))
        .args(["-timeout", run.timeout, "-timeout_error"])
        .args(["-max_recv_loops", "1000"])
        .args(run.args)
        .current_dir(run.dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(r) = run.remote {
        cmd.arg(r.to_string());
    }
    let child = cmd
        .spawn()
        .expect("sipp runs (package sip-tester, installed by the test command)");
    (child, messages)
}

/// Starts SIPp for one call (`-m 1`) with `scenario` (a file under tests/sipp, or a
/// path), local port `port`, against `remote` (None for a callee).
pub fn start(
    dir: &Path,
    name: &str,
    scenario: &Path,
    port: u16,
    remote: Option<SocketAddr>,
    extra: &[&str],
) -> Sipp {
    let mut args = vec!["-m", "1"];
    args.extend_from_slice(extra);
    let (child, messages) = spawn(Run {
        dir,
        name,
        scenario,
        port,
        remote,
        timeout: "30s",
        args: &args,
    });
    Sipp {
        child,
        name: name.to_owned(),
        messages,
    }
}

impl Sipp {
    /// Waits for SIPp to finish (bounded) and panics with its output if it failed.
    pub async fn expect_success(self, limit: Duration) -> Vec<SeenMessage> {
        finish(self.child, &self.name, &self.messages, limit).await
    }
}

/// Waits (bounded) for a SIPp child to finish and returns what it logged; panics with its
/// output, error file and message ladder when it failed.
pub async fn finish(
    child: Child,
    name: &str,
    messages: &Path,
    limit: Duration,
) -> Vec<SeenMessage> {
    let out = match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("{name}: {e}"),
        Err(_) => panic!("{name}: sipp still running after {limit:?}"),
    };
    let seen = read_messages(messages);
    if out.status.code() != Some(0) {
        let errors =
            std::fs::read_to_string(messages.with_extension("").with_extension("errors.log"))
                .unwrap_or_default();
        panic!(
            "{name} failed ({:?}):\n{}\n{}\nerrors: {errors}\nmessages:\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n"),
            String::from_utf8_lossy(&out.stderr),
            seen.iter()
                .map(|m| format!("{} {}", if m.sent { ">>" } else { "<<" }, m.first_line()))
                .collect::<Vec<_>>()
                .join("\n"),
        );
    }
    seen
}

/// One message in a SIPp message log.
#[derive(Debug, Clone)]
pub struct SeenMessage {
    pub sent: bool,
    pub text: String,
}

impl SeenMessage {
    pub fn first_line(&self) -> &str {
        self.text.lines().next().unwrap_or("")
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.text
            .lines()
            .skip(1)
            .take_while(|l| !l.trim().is_empty())
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
            })
    }
    pub fn body(&self) -> &str {
        self.text
            .split_once("\n\n")
            .or_else(|| self.text.split_once("\r\n\r\n"))
            .map(|(_, b)| b)
            .unwrap_or("")
    }
    /// "INVITE", "ACK"... for requests, "200"... for responses.
    pub fn kind(&self) -> String {
        let l = self.first_line();
        if let Some(rest) = l.strip_prefix("SIP/2.0 ") {
            rest.split(' ').next().unwrap_or("").to_owned()
        } else {
            l.split(' ').next().unwrap_or("").to_owned()
        }
    }
}

pub fn read_messages(path: &Path) -> Vec<SeenMessage> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = Vec::new();
    for block in text
        .split("----------------------------------------------- ")
        .skip(1)
    {
        let mut lines = block.lines();
        let _stamp = lines.next();
        let Some(what) = lines.next() else { continue };
        let sent = what.contains("sent");
        if !(what.contains("message sent") || what.contains("message received")) {
            continue;
        }
        let rest: Vec<&str> = lines.skip_while(|l| l.trim().is_empty()).collect();
        let msg = rest.join("\n").trim_end().to_owned();
        if !msg.is_empty() {
            out.push(SeenMessage { sent, text: msg });
        }
    }
    out
}

/// The kinds of messages received, in order ("INVITE", "200", ...).
pub fn received(seen: &[SeenMessage]) -> Vec<String> {
    seen.iter().filter(|m| !m.sent).map(|m| m.kind()).collect()
}

/// Distinct Call-IDs of a side's messages.
pub fn call_ids(seen: &[SeenMessage]) -> Vec<String> {
    let mut ids: Vec<String> = seen
        .iter()
        .filter_map(|m| m.header("Call-ID").map(str::to_owned))
        .collect();
    ids.sort();
    ids.dedup();
    ids
}

/// tests/sipp/uac_fail.xml with the failure status the caller expects written in: the
/// scenario's path under `dir`.
pub fn fail_scenario(dir: &Path, status: u16) -> String {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/sipp/uac_fail.xml"),
    )
    .unwrap();
    let path = dir.join(format!("uac_fail_{status}.xml"));
    std::fs::write(&path, text.replace("EXPECTED_STATUS", &status.to_string())).unwrap();
    path.display().to_string()
}
