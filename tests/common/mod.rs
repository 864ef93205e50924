//! Shared helpers of the integration tests: a server on port 0 and raw SIP peers.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use strowger::config::Config;
use strowger::server::ServerHandle;
use strowger::transport::TransportKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

pub fn test_config() -> Config {
    let mut c = Config::default();
    c.sip.listen = vec!["udp:127.0.0.1:0".into(), "tcp:127.0.0.1:0".into()];
    c.sip.domain = "strowger.test".into();
    c.http.listen = "127.0.0.1:0".into();
    // Each server its own registration store.
    let dir = std::env::temp_dir().join(unique("strowger-store"));
    c.storage.dir = dir.display().to_string();
    c
}

pub struct TestServer {
    pub handle: ServerHandle,
    pub udp: SocketAddr,
    pub tcp: SocketAddr,
}

pub async fn start_server() -> TestServer {
    start_with(test_config()).await
}

pub async fn start_with(config: Config) -> TestServer {
    let handle = strowger::server::start(&config)
        .await
        .expect("server starts");
    let udp = handle.addr(TransportKind::Udp).expect("udp bound");
    let tcp = handle.addr(TransportKind::Tcp).expect("tcp bound");
    TestServer { handle, udp, tcp }
}

static SEQ: AtomicU64 = AtomicU64::new(1);

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A request from a peer at `from` (its Via sent-by, with rport), Content-Length computed.
pub fn request(
    method: &str,
    ruri: &str,
    from: SocketAddr,
    transport: &str,
    call_id: &str,
    extra: &str,
    body: &str,
) -> String {
    format!(
        "{method} {ruri} SIP/2.0\r\n\
         Via: SIP/2.0/{transport} {from};branch=z9hG4bK{branch};rport\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:alice@example.com>;tag=a{branch}\r\n\
         To: <sip:bob@strowger.test>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 {method}\r\n\
         {extra}\
         Content-Length: {len}\r\n\r\n{body}",
        branch = unique("b"),
        len = body.len(),
    )
}

pub fn status(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

pub fn reason(resp: &str) -> &str {
    let line = resp.lines().next().unwrap_or("");
    line.splitn(3, ' ').nth(2).unwrap_or("")
}

/// The value of the first header `name` (case-insensitive), compact forms not expanded.
pub fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    msg.split("\r\n\r\n").next()?.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

pub struct UdpPeer {
    pub sock: UdpSocket,
    pub addr: SocketAddr,
}

impl UdpPeer {
    pub async fn bind(ip: &str) -> UdpPeer {
        let sock = UdpSocket::bind(format!("{ip}:0")).await.unwrap();
        let addr = sock.local_addr().unwrap();
        UdpPeer { sock, addr }
    }
    pub async fn send(&self, to: SocketAddr, msg: &[u8]) {
        self.sock.send_to(msg, to).await.unwrap();
    }
    /// The next datagram, or None after `wait`.
    pub async fn recv(&self, wait: Duration) -> Option<String> {
        let mut buf = vec![0u8; 65535];
        match tokio::time::timeout(wait, self.sock.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            _ => None,
        }
    }
    /// The next final response (skipping 1xx), or None after `wait`.
    pub async fn recv_final(&self, wait: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let r = self.recv(left).await?;
            if status(&r) >= 200 {
                return Some(r);
            }
        }
    }
}

pub const WAIT: Duration = Duration::from_secs(3);

/// Reads SIP messages from a TCP stream, framed by Content-Length.
pub struct TcpPeer {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl TcpPeer {
    pub async fn connect(to: SocketAddr) -> TcpPeer {
        TcpPeer {
            stream: TcpStream::connect(to).await.unwrap(),
            buf: Vec::new(),
        }
    }
    pub fn local(&self) -> SocketAddr {
        self.stream.local_addr().unwrap()
    }
    pub async fn write(&mut self, data: &[u8]) {
        self.stream.write_all(data).await.unwrap();
    }
    pub async fn recv(&mut self, wait: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(text) = std::str::from_utf8(&self.buf).ok().map(str::to_owned) {
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = header(&text[..end + 4], "Content-Length")
                        .or_else(|| header(&text[..end + 4], "l"))
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    if text.len() >= end + 4 + len {
                        let msg = text[..end + 4 + len].to_owned();
                        self.buf.drain(..end + 4 + len);
                        return Some(msg);
                    }
                }
            }
            let mut chunk = [0u8; 8192];
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
    pub async fn recv_final(&mut self, wait: Duration) -> Option<String> {
        loop {
            let r = self.recv(wait).await?;
            if status(&r) >= 200 {
                return Some(r);
            }
        }
    }
}

/// Runs SIPp (Debian package sip-tester, installed by tests/setup-and-run.sh) with a time
/// bound, returning its exit status and output. Panics when sipp is missing: the test
/// command installs it, so a missing sipp is a set-up error, not a skip.
pub async fn run_sipp(args: &[String], limit: Duration) -> std::process::Output {
    let mut cmd = tokio::process::Command::new("sipp");
    cmd.args(args)
        .arg("-nostdin")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .kill_on_drop(true);
    let child = cmd.output();
    match tokio::time::timeout(limit, child).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => panic!("cannot run sipp (install package sip-tester): {e}"),
        Err(_) => panic!("sipp did not finish within {limit:?}"),
    }
}
pub mod certs;
pub mod redis;
pub mod sipp;

/// Polls `cond` every 50 ms for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// A port of 127.0.0.1 free for both UDP and TCP right now, for a peer that listens on
/// both (dnsmasq, baresip): a port found free for UDP alone may be some TCP connection's
/// ephemeral port.
pub fn free_udp_and_tcp_port() -> u16 {
    for _ in 0..100 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port of 127.0.0.1 free for both UDP and TCP in 100 tries")
}

/// The first of `n` consecutive ports of 127.0.0.1 free for both UDP and TCP right now,
/// taken below the kernel's ephemeral range, for a peer that binds more than one port
/// (baresip puts TLS on its SIP port + 1). Outside that range no other test's outgoing
/// connection or `:0` socket can take one of them between this check and the peer's bind.
pub fn free_port_run(n: u16) -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let floor = 10_000u16;
    if low <= floor + 1000 {
        // An unusual range: fall back to ports the kernel picks, checked the same way.
        return free_udp_and_tcp_port();
    }
    for _ in 0..200 {
        let start = rand::random_range(floor..low - n);
        let all_free = (start..start + n).all(|port| {
            let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
            let tcp = std::net::TcpListener::bind(("127.0.0.1", port));
            udp.is_ok() && tcp.is_ok()
        });
        if all_free {
            return start;
        }
    }
    panic!("no run of {n} ports of 127.0.0.1 free for UDP and TCP in 200 tries")
}

/// The `strowger` binary of this build running `config`, its log (stderr) appended to
/// `log`; the caller stops it by its PID.
pub fn spawn_strowger(config: &std::path::Path, log: &std::path::Path) -> std::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_strowger"))
        .args(["run", "--config", config.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("strowger starts")
}

/// A free UDP address for a server's SIP and a free TCP one for its admin API, on
/// 127.0.0.1.
pub fn free_sip_and_http() -> (SocketAddr, SocketAddr) {
    let sip: SocketAddr = format!("127.0.0.1:{}", sipp::free_udp_port())
        .parse()
        .unwrap();
    let http = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    (sip, http)
}

/// Where a cluster node run as the binary keeps its things, under `<dir>/<name>/`.
pub struct ClusterNodeFiles {
    pub sip: SocketAddr,
    pub http: SocketAddr,
    pub config: std::path::PathBuf,
    pub log: std::path::PathBuf,
    pub records: std::path::PathBuf,
}

/// Bearer token of the cluster nodes' admin API.
pub const CLUSTER_TOKEN: &str = "cluster-test";

/// Writes the config of cluster node `name` (`[cluster] enabled`, free SIP and HTTP
/// ports on 127.0.0.1, dial plan `plan`, call records, Redis at `redis`); `extra` is
/// appended (more sections).
pub fn cluster_node_files(
    dir: &std::path::Path,
    name: &str,
    redis: &str,
    plan: &std::path::Path,
    lease_s: u64,
    extra: &str,
) -> ClusterNodeFiles {
    let ndir = dir.join(name);
    std::fs::create_dir_all(&ndir).unwrap();
    let (sip, http) = free_sip_and_http();
    let records = ndir.join("records.jsonl");
    let config = ndir.join("strowger.toml");
    std::fs::write(
        &config,
        format!(
            "[sip]\nlisten = [\"udp:{sip}\"]\ndomain = \"strowger.test\"\n\
             [http]\nlisten = \"{http}\"\ntoken = \"{CLUSTER_TOKEN}\"\n\
             [script]\npath = {plan:?}\n\
             [storage]\ndir = {data:?}\n\
             [call]\nrecords_file = {records:?}\n\
             [redis]\nurl = \"{redis}\"\n\
             [log]\nlevel = \"info\"\n\
             [cluster]\nenabled = true\nnode = \"{name}\"\nlease_s = {lease_s}\n{extra}",
            plan = plan.display().to_string(),
            data = ndir.join("data").display().to_string(),
            records = records.display().to_string(),
        ),
    )
    .unwrap();
    ClusterNodeFiles {
        sip,
        http,
        config,
        log: ndir.join("server.log"),
        records,
    }
}

/// The lines of a call-record file (`call.records_file`), one JSON object per ended call.
pub fn read_records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}
