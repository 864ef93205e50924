//! Server configuration: the TOML file, `STROWGER_*` environment overrides, defaults and
//! validation.
//!
//! Owns: the shape of the configuration, its defaults, where values come from, and the
//! start-up errors for anything wrong in them. Must not touch: what the values mean at run
//! time (each layer reads its own keys), and parsing of `sip.listen` entries into socket
//! types, which the transport layer does itself; here they are only checked for form.
//!
//! Sources, later ones winning:
//! 1. the TOML file: `--config PATH`, or `config/strowger.toml` in the working directory,
//!    or, when that default file is absent, the copy of `config/strowger.toml` built into
//!    the binary (so the server runs from any directory). An explicit path that cannot be
//!    read is an error, never a silent fallback.
//! 2. environment variables `STROWGER_<SECTION>__<KEY>` (double underscore between
//!    levels, names case-insensitive), e.g. `STROWGER_SIP__DOMAIN=example.com`,
//!    `STROWGER_SIP__TIMERS__T1_MS=250`; the list `sip.listen` is comma-separated:
//!    `STROWGER_SIP__LISTEN="udp:127.0.0.1:5070,tcp:127.0.0.1:5070"`.
//!
//! Unknown keys (in the file or as `STROWGER_*` variables) and bad values stop start-up
//! with a [`ConfigError`] that names the file (or variable), the key, the line where it can
//! be found, and the problem: a typo must never fall back to a default silently.
//!
//! Config keys (defaults in brackets; `config/strowger.toml` documents each one):
//! - `sip.listen` [`["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"]`], `sip.domain`
//!   [`localhost`], `sip.timers.t1_ms` [500], `sip.timers.t2_ms` [4000],
//!   `sip.timers.t4_ms` [5000], `sip.max_message_size` [65535], `sip.user_agent`
//!   [`Strowger/<version>`], `sip.tcp_idle_timeout_s` [300], `sip.workers` [1; 0 = one per
//!   core]
//! - `http.listen` [`127.0.0.1:9090`], `http.token` [empty = admin API open on loopback
//!   only, disabled elsewhere]
//! - `log.level` [`info`], `log.format` [`text`|`json`, default `text`]
//! - `script.path` [`scripts/default.lua`], `script.memory_limit_kb` [8192],
//!   `script.instruction_limit` [1000000], `script.vm_pool_size` [0 = one per core]
//! - `call.ring_timeout_s` [60] (a dial without `timeout` rings this long),
//!   `call.records_file` [empty = off] (call records appended as JSON lines),
//!   `call.routes` [empty] (names `call:set_route` accepts), `call.trace` [true],
//!   `call.trace_max_messages` [100], `call.trace_keep_ended` [100]
//! - `registrar.min_expires` [60], `registrar.max_expires` [3600],
//!   `registrar.default_expires` [3600], `registrar.store` [`embedded`|`redis`],
//!   `registrar.users_file` [empty = no authentication], `registrar.unknown_aor_status` [404],
//!   `registrar.keepalive_interval_s` [0 = off; else 5..=3600]
//! - `storage.dir` [`data`], `redis.url` [`redis://127.0.0.1:6379/`]
//! - `auth.nonce_ttl_s` [300], `auth.max_failures` [5], `auth.failure_window_s` [60],
//!   `auth.algorithms` [`["SHA-256", "MD5"]`]
//! - `shutdown.drain_timeout_s` [10]
//! - `huntgroups.<name>.strategy` [`ring-all`], `.members` (required), `.ring_timeout` [15],
//!   `.max_wait` [120], `.wrap_up` [10], `.weights` [all 1], `.max_missed` [3],
//!   `.queue_announce` [20], `.calls_reset_s` [86400]: see [`HuntGroupConfig`]; none by
//!   default, not settable from the environment
//! - `presence.max_message_size` [4096] (MESSAGE bodies above it get 413),
//!   `presence.min_expires` [60], `presence.max_expires` [3600],
//!   `presence.default_expires` [3600] (SUBSCRIBE and PUBLISH intervals),
//!   `presence.min_notify_interval_ms` [200] (changes within it are coalesced per
//!   subscriber), `presence.authenticate` [false] (digest for PUBLISH, SUBSCRIBE,
//!   MESSAGE; needs `registrar.users_file`)
//!
//! How a line number is found: the `config` crate that merges the sources keeps no
//! positions, so the file is first parsed on its own with `toml` (whose errors carry a
//! span), and errors found later (in validation) are mapped back to a line by scanning the
//! file text for the key inside its `[section]`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The file read when no `--config` is given (relative to the working directory).
pub const DEFAULT_PATH: &str = "config/strowger.toml";

/// The shipped `config/strowger.toml`, used when [`DEFAULT_PATH`] does not exist.
const EMBEDDED: &str = include_str!("../config/strowger.toml");

/// Prefix of the environment variables that override file values.
const ENV_PREFIX: &str = "STROWGER";
/// Separates levels in an environment variable name (`STROWGER_SIP__TIMERS__T1_MS`).
const ENV_SEPARATOR: &str = "__";

/// Upper bound of the SIP timers: the transaction layer multiplies T1 by 64, and a typo in
/// the millions would keep transactions alive for days (or overflow a `Duration`).
const MAX_TIMER_MS: u64 = 3_600_000;
/// Upper bound of the second-valued timeouts, so deadline arithmetic cannot overflow.
const MAX_TIMEOUT_S: u64 = 86_400;
/// Bounds of `sip.max_message_size`: smaller than 1 KiB cannot hold a real INVITE; larger
/// than 16 MiB is a typo that would let one peer make us buffer that much per connection.
const MIN_MESSAGE_SIZE: usize = 1024;
const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;
/// Upper bound of `script.memory_limit_kb` (4 GiB), so KiB→bytes cannot overflow.
const MAX_SCRIPT_MEMORY_KB: usize = 4 * 1024 * 1024;
/// Upper bound of `sip.workers`: more threads than this is a typo.
const MAX_WORKERS: usize = 1024;
/// Upper bound of `script.vm_pool_size`: each VM costs memory; more than this is a typo.
const MAX_VM_POOL: usize = 1024;
/// Most route names in `call.routes` (each is a metric label value).
pub const MAX_ROUTES: usize = 64;
/// Bounds of `registrar.keepalive_interval_s` when it is not 0 (off). Below 5 s the pings of
/// many phones become a load of their own (and a ping of a silent phone lasts timer F,
/// 32 s); above an hour they neither keep a NAT mapping open (RFC 4787 REQ-5 asks for at
/// least 2 minutes, many NATs keep less) nor find a dead phone before its registration
/// (`max_expires` defaults to an hour) would lapse anyway.
const MIN_KEEPALIVE_S: u64 = 5;
const MAX_KEEPALIVE_S: u64 = 3600;

/// A configuration problem, with where it was found.
///
/// Displays as `FILE:LINE: KEY: MESSAGE`, e.g.
/// `config/strowger.toml:12: sip.timers.t1_ms: must be at least 1 (got 0)`; the line and
/// the key are left out when unknown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", location(.file, .line, .key))]
pub struct ConfigError {
    /// The file the value came from, or `environment variable STROWGER_...` when an
    /// environment variable set it.
    pub file: String,
    /// The dotted key, e.g. `sip.timers.t1_ms`; empty when the problem is the whole file.
    pub key: String,
    /// 1-based line in `file`, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

fn location(file: &str, line: &Option<usize>, key: &str) -> String {
    let mut s = String::from(file);
    if let Some(line) = line {
        s.push(':');
        s.push_str(&line.to_string());
    }
    s.push_str(": ");
    if !key.is_empty() {
        s.push_str(key);
        s.push_str(": ");
    }
    s
}

/// Where the file part of a configuration came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// A file on disk.
    File(PathBuf),
    /// The copy of `config/strowger.toml` built into the binary ([`DEFAULT_PATH`] was absent).
    Embedded,
}

impl ConfigSource {
    /// The name used in error messages.
    fn label(&self) -> String {
        match self {
            ConfigSource::File(p) => p.display().to_string(),
            ConfigSource::Embedded => format!("<built-in {DEFAULT_PATH}>"),
        }
    }
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigSource::File(p) => write!(f, "{}", p.display()),
            ConfigSource::Embedded => write!(
                f,
                "built-in defaults ({DEFAULT_PATH} not found in the working directory)"
            ),
        }
    }
}

/// The whole configuration. Every field has a default, so an empty file is valid.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub sip: SipConfig,
    pub http: HttpConfig,
    pub log: LogConfig,
    pub script: ScriptConfig,
    pub call: CallConfig,
    pub registrar: RegistrarSection,
    pub storage: StorageConfig,
    pub redis: RedisConfig,
    pub auth: AuthConfig,
    pub shutdown: ShutdownConfig,
    /// `[huntgroups.<name>]`: call-centre hunt groups (see [`HuntGroupConfig`]).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub huntgroups: BTreeMap<String, HuntGroupConfig>,
    pub presence: PresenceSection,
}

/// `[sip]`: the SIP side of the server.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SipConfig {
    /// `TRANSPORT:IP:PORT` entries (`udp` or `tcp`, IPv6 in brackets); port 0 = any free port.
    pub listen: Vec<String>,
    /// The domain the server is responsible for.
    pub domain: String,
    pub timers: TimersConfig,
    /// Largest accepted SIP message, bytes.
    pub max_message_size: usize,
    /// Value of the Server / User-Agent headers.
    pub user_agent: String,
    /// Idle TCP connections are closed after this many seconds.
    pub tcp_idle_timeout_s: u64,
    /// Threads that carry SIP (the async runtime's workers); 0 = one per core.
    pub workers: usize,
}

impl Default for SipConfig {
    fn default() -> Self {
        SipConfig {
            listen: vec!["udp:127.0.0.1:5060".into(), "tcp:127.0.0.1:5060".into()],
            domain: "localhost".into(),
            timers: TimersConfig::default(),
            max_message_size: 65535,
            user_agent: concat!("Strowger/", env!("CARGO_PKG_VERSION")).into(),
            tcp_idle_timeout_s: 300,
            // One thread reads, handles and answers each message: measured on 2 cores
            // (benches/callgrind.sh), a second worker tripled the context switches per call
            // (5.3 -> 15.6) and added 13 system calls per call for the hand-offs.
            workers: 1,
        }
    }
}

/// `[sip.timers]`: RFC 3261 timers, milliseconds.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TimersConfig {
    pub t1_ms: u64,
    pub t2_ms: u64,
    pub t4_ms: u64,
}

impl Default for TimersConfig {
    fn default() -> Self {
        // RFC 3261 17.1.1.1 / table 4 values.
        TimersConfig {
            t1_ms: 500,
            t2_ms: 4000,
            t4_ms: 5000,
        }
    }
}

/// `[http]`: the admin / metrics endpoint.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `IP:PORT`.
    pub listen: String,
    /// Bearer token of the admin API (`/registrations`, `/reload`, `/drain`); empty = none:
    /// then only a loopback `listen` serves them, without a token.
    pub token: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9090".into(),
            token: String::new(),
        }
    }
}

/// `[log]`.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A level (`trace` .. `error`) or a tracing `EnvFilter` directive string.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// `log.format`.
#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[script]`: the Lua dial plan. The limits are read by the Lua layer.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ScriptConfig {
    pub path: String,
    /// Per-VM memory limit in KiB; 0 = no limit.
    pub memory_limit_kb: usize,
    /// VM instructions one hook run may execute.
    pub instruction_limit: u64,
    /// Number of Lua VMs; 0 = one per CPU core.
    pub vm_pool_size: usize,
}

impl Default for ScriptConfig {
    fn default() -> Self {
        ScriptConfig {
            path: "scripts/default.lua".into(),
            memory_limit_kb: 8192,
            instruction_limit: 1_000_000,
            vm_pool_size: 0,
        }
    }
}

/// `[call]`: defaults of the call core that a script can override per dial.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CallConfig {
    /// How long a dial rings when the script gives no `timeout`, seconds.
    pub ring_timeout_s: u64,
    /// File that gets one JSON line per ended call (created when missing, appended to);
    /// empty = no call-record file.
    pub records_file: String,
    /// Route names a script may tag calls with (`call:set_route`): metric labels, so a
    /// fixed set of at most [`MAX_ROUTES`] names of letters, digits, `-` and `_`.
    pub routes: Vec<String>,
    /// Keep each call's SIP messages for `GET /calls/{id}/trace`.
    pub trace: bool,
    /// Most messages kept per call (a long call with many re-INVITEs keeps its first ones).
    pub trace_max_messages: usize,
    /// Traces of this many ended calls stay readable (the most recent ones).
    pub trace_keep_ended: usize,
}

impl Default for CallConfig {
    fn default() -> Self {
        CallConfig {
            ring_timeout_s: 60,
            records_file: String::new(),
            routes: Vec::new(),
            trace: true,
            trace_max_messages: 100,
            trace_keep_ended: 100,
        }
    }
}

/// Where the registrar keeps its bindings.
#[derive(Deserialize, Serialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RegistrarStore {
    /// A local SQLite file under `storage.dir`: no server to install.
    #[default]
    Embedded,
    /// Redis at `redis.url`, shared by several nodes.
    Redis,
}

/// `[registrar]`: REGISTER handling (RFC 3261 10) and who may register.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrarSection {
    /// Shorter registrations get 423 with Min-Expires, seconds.
    pub min_expires: u32,
    /// Longer registrations are cut to this, seconds.
    pub max_expires: u32,
    /// Expiry of a REGISTER that gives none, seconds.
    pub default_expires: u32,
    pub store: RegistrarStore,
    /// TOML file of users (`[users.alice]` with `ha1_md5`/`ha1_sha256` or `password`);
    /// empty = no digest authentication (development only).
    pub users_file: String,
    /// Status for a REGISTER whose To is not in `sip.domain`: 404 or 403.
    pub unknown_aor_status: u16,
    /// Seconds between OPTIONS pings of each registered contact; a contact that stops
    /// answering is skipped by lookups until it answers again. 0 = no pings.
    pub keepalive_interval_s: u64,
}

impl Default for RegistrarSection {
    fn default() -> Self {
        RegistrarSection {
            min_expires: 60,
            max_expires: 3600,
            default_expires: 3600,
            store: RegistrarStore::Embedded,
            users_file: String::new(),
            unknown_aor_status: 404,
            keepalive_interval_s: 0,
        }
    }
}

/// `[storage]`: the embedded store.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory of the embedded database files (created when missing).
    pub dir: String,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig { dir: "data".into() }
    }
}

/// `[redis]`: used when `registrar.store = "redis"`.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    pub url: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/".into(),
        }
    }
}

/// `[auth]`: digest authentication (RFC 3261 22, RFC 8760).
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// How long a nonce is good for, seconds (then `stale=true`).
    pub nonce_ttl_s: u64,
    /// Failed attempts from one source address within `failure_window_s` before 403.
    pub max_failures: u32,
    pub failure_window_s: u64,
    /// Digest algorithms offered, in order of preference: "SHA-256", "MD5".
    pub algorithms: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            nonce_ttl_s: 300,
            max_failures: 5,
            failure_window_s: 60,
            algorithms: vec!["SHA-256".into(), "MD5".into()],
        }
    }
}

/// `[shutdown]`.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// How long calls in progress may take to finish after SIGTERM, seconds.
    pub drain_timeout_s: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            drain_timeout_s: 10,
        }
    }
}

// ---- hunt groups (issue 6) -------------------------------------------------------------

/// `[huntgroups.<name>]`: one hunt group. Durations in seconds. Not settable from the
/// environment (a group is a table of its own).
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HuntGroupConfig {
    /// `ring-all`, `linear`, `round-robin`, `least-recent`, `fewest-calls`, `random`,
    /// `weighted`.
    pub strategy: String,
    /// Extensions (`"1001"`: rung at their registered contacts) or SIP URIs.
    pub members: Vec<String>,
    /// How long one agent (or, for ring-all, everyone) rings before the next try.
    pub ring_timeout: u64,
    /// How long a caller may wait in all before the outcome goes back to the script.
    pub max_wait: u64,
    /// Seconds after a call before the agent is rung again.
    pub wrap_up: u64,
    /// One weight per member, for `weighted` (empty = all 1).
    pub weights: Vec<u32>,
    /// Unanswered rings in a row after which the agent is paused (0 = never).
    pub max_missed: u32,
    /// Seconds between the 182 Queued repeats to a waiting caller.
    pub queue_announce: u64,
    /// `fewest-calls` counts answered calls since the last multiple of this many seconds
    /// since the Unix epoch (86400 = since midnight UTC).
    pub calls_reset_s: u64,
}

impl Default for HuntGroupConfig {
    fn default() -> Self {
        HuntGroupConfig {
            strategy: "ring-all".into(),
            members: Vec::new(),
            ring_timeout: 15,
            max_wait: 120,
            wrap_up: 10,
            weights: Vec::new(),
            max_missed: 3,
            queue_announce: 20,
            calls_reset_s: 86400,
        }
    }
}

/// `[presence]`: SUBSCRIBE/NOTIFY, PUBLISH and MESSAGE (RFC 6665, 3903, 3428).
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceSection {
    /// Largest MESSAGE body accepted, bytes; larger ones get 413 (RFC 3428 7).
    pub max_message_size: usize,
    /// Shorter SUBSCRIBE/PUBLISH intervals get 423 with Min-Expires, seconds.
    pub min_expires: u32,
    /// Longer intervals are cut to this, seconds.
    pub max_expires: u32,
    /// The interval of a SUBSCRIBE or PUBLISH that gives none, seconds.
    pub default_expires: u32,
    /// Changes within this many milliseconds of the last NOTIFY to a subscriber are
    /// sent together in one NOTIFY (RFC 6665 4.2.2 rate limit).
    pub min_notify_interval_ms: u64,
    /// PUBLISH, SUBSCRIBE and MESSAGE must carry digest credentials of a user of
    /// `registrar.users_file`, and a PUBLISH may only set its sender's own state.
    pub authenticate: bool,
}

impl Default for PresenceSection {
    fn default() -> Self {
        PresenceSection {
            max_message_size: 4096,
            min_expires: 60,
            max_expires: 3600,
            default_expires: 3600,
            min_notify_interval_ms: 200,
            authenticate: false,
        }
    }
}

const HUNT_STRATEGIES: [&str; 7] = [
    "ring-all",
    "linear",
    "round-robin",
    "least-recent",
    "fewest-calls",
    "random",
    "weighted",
];

impl Config {
    /// Checks every `[huntgroups.<name>]`: (dotted key, problem) of the first bad value.
    fn check_huntgroups(&self) -> Result<(), (String, String, Option<String>)> {
        for (name, g) in &self.huntgroups {
            let key = |k: &str| format!("huntgroups.{name}.{k}");
            let bad = |k: &str, m: String| Err((key(k), m, None));
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
            {
                return Err((
                    format!("huntgroups.{name}"),
                    "a group name is lower-case letters, digits, - and _".into(),
                    None,
                ));
            }
            if !HUNT_STRATEGIES.contains(&g.strategy.as_str()) {
                return bad(
                    "strategy",
                    format!(
                        "unknown strategy {:?}, expected one of {}",
                        g.strategy,
                        HUNT_STRATEGIES.join(", ")
                    ),
                );
            }
            if g.members.is_empty() {
                return bad("members", "at least one member is required".into());
            }
            let mut seen = std::collections::HashSet::new();
            for m in &g.members {
                let ok = !m.is_empty()
                    && !m
                        .chars()
                        .any(|c| c.is_whitespace() || c.is_control() || "<>\"".contains(c))
                    && (!m.contains(':') || crate::sip::Uri::parse(m).is_ok());
                if !ok {
                    return Err((
                        key("members"),
                        format!("bad member {m:?}: an extension (\"1001\") or a SIP URI"),
                        Some(format!("\"{m}\"")),
                    ));
                }
                if !seen.insert(m) {
                    return Err((
                        key("members"),
                        format!("member {m:?} is listed twice"),
                        Some(format!("\"{m}\"")),
                    ));
                }
            }
            if !g.weights.is_empty() && g.weights.len() != g.members.len() {
                return bad(
                    "weights",
                    format!(
                        "one weight per member: {} members, {} weights",
                        g.members.len(),
                        g.weights.len()
                    ),
                );
            }
            if g.strategy == "weighted"
                && g.weights.iter().all(|w| *w == 0)
                && !g.weights.is_empty()
            {
                return bad("weights", "at least one weight must be above 0".into());
            }
            for (k, v, min, max) in [
                ("ring_timeout", g.ring_timeout, 1, MAX_TIMEOUT_S),
                ("max_wait", g.max_wait, 1, MAX_TIMEOUT_S),
                ("wrap_up", g.wrap_up, 0, MAX_TIMEOUT_S),
                ("queue_announce", g.queue_announce, 1, MAX_TIMEOUT_S),
                ("calls_reset_s", g.calls_reset_s, 60, 366 * 86400),
            ] {
                if v < min || v > max {
                    return bad(k, format!("must be between {min} and {max} (got {v})"));
                }
            }
        }
        Ok(())
    }
}

/// A value that failed validation: the key, what is wrong, and optionally a piece of text
/// (a list entry) that points at the exact line better than the key does.
struct Invalid {
    key: &'static str,
    message: String,
    needle: Option<String>,
}

fn invalid(key: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        key,
        message: message.into(),
        needle: None,
    }
}

impl Config {
    /// Loads the configuration: the file (see the module docs for which one), then
    /// `STROWGER_*` environment variables, then validation.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_source(path).map(|(config, _)| config)
    }

    /// Like [`Config::load`], also telling which file was used.
    pub fn load_with_source(path: Option<&Path>) -> Result<(Config, ConfigSource), ConfigError> {
        let env = process_env()?;
        load_from(path, &env)
    }

    /// Parses and validates TOML text alone (no environment). `origin` names the text in
    /// errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
        build(origin, text, &[])
    }

    /// The RFC 3261 timers T1, T2 and T4.
    pub fn timers(&self) -> (Duration, Duration, Duration) {
        let t = &self.sip.timers;
        (
            Duration::from_millis(t.t1_ms),
            Duration::from_millis(t.t2_ms),
            Duration::from_millis(t.t4_ms),
        )
    }

    /// Checks every value; returns the first problem.
    fn check(&self) -> Result<(), Invalid> {
        let sip = &self.sip;
        if sip.listen.is_empty() {
            return Err(invalid(
                "sip.listen",
                "at least one address is required (e.g. \"udp:127.0.0.1:5060\")",
            ));
        }
        for entry in &sip.listen {
            if let Err(problem) = validate_listen_entry(entry) {
                return Err(Invalid {
                    key: "sip.listen",
                    message: format!("bad entry {entry:?}: {problem}"),
                    needle: Some(format!("\"{entry}\"")),
                });
            }
        }
        if sip.domain.is_empty() {
            return Err(invalid("sip.domain", "must not be empty"));
        }
        if sip
            .domain
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "sip.domain",
                format!(
                    "must be a host name, without spaces or control characters (got {:?})",
                    sip.domain
                ),
            ));
        }
        let t = &sip.timers;
        range("sip.timers.t1_ms", t.t1_ms, 1, MAX_TIMER_MS)?;
        if t.t2_ms < t.t1_ms {
            return Err(invalid(
                "sip.timers.t2_ms",
                format!("must be at least t1_ms ({}) (got {})", t.t1_ms, t.t2_ms),
            ));
        }
        range("sip.timers.t2_ms", t.t2_ms, 1, MAX_TIMER_MS)?;
        range("sip.timers.t4_ms", t.t4_ms, 1, MAX_TIMER_MS)?;
        range(
            "sip.max_message_size",
            sip.max_message_size,
            MIN_MESSAGE_SIZE,
            MAX_MESSAGE_SIZE,
        )?;
        // The value goes into a header verbatim; CR or LF would inject header lines.
        if sip.user_agent.is_empty() || sip.user_agent.chars().any(char::is_control) {
            return Err(invalid(
                "sip.user_agent",
                format!(
                    "must be non-empty text without control characters (got {:?})",
                    sip.user_agent
                ),
            ));
        }
        range(
            "sip.tcp_idle_timeout_s",
            sip.tcp_idle_timeout_s,
            1,
            MAX_TIMEOUT_S,
        )?;

        if let Err(e) = self.http.listen.parse::<SocketAddr>() {
            return Err(invalid(
                "http.listen",
                format!(
                    "{:?} is not IP:PORT ({e}; IPv6 goes in brackets: [::1]:9090)",
                    self.http.listen
                ),
            ));
        }

        if self
            .http
            .token
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "http.token",
                "must not contain spaces or control characters",
            ));
        }

        if let Err(problem) = validate_log_level(&self.log.level) {
            return Err(invalid("log.level", problem));
        }

        if self.script.path.is_empty() {
            return Err(invalid("script.path", "must not be empty"));
        }
        range(
            "script.memory_limit_kb",
            self.script.memory_limit_kb,
            0,
            MAX_SCRIPT_MEMORY_KB,
        )?;
        range(
            "script.instruction_limit",
            self.script.instruction_limit,
            1,
            u64::MAX,
        )?;
        range("sip.workers", self.sip.workers, 0, MAX_WORKERS)?;
        range(
            "script.vm_pool_size",
            self.script.vm_pool_size,
            0,
            MAX_VM_POOL,
        )?;
        range(
            "call.ring_timeout_s",
            self.call.ring_timeout_s,
            1,
            MAX_TIMEOUT_S,
        )?;
        if self.call.records_file.chars().any(char::is_control) {
            return Err(invalid(
                "call.records_file",
                format!(
                    "must be a path without control characters (got {:?})",
                    self.call.records_file
                ),
            ));
        }
        if self.call.routes.len() > MAX_ROUTES {
            return Err(invalid(
                "call.routes",
                format!("at most {MAX_ROUTES} routes (metric labels stay bounded)"),
            ));
        }
        for (i, r) in self.call.routes.iter().enumerate() {
            let ok = !r.is_empty()
                && r.len() <= 64
                && r.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok {
                return Err(invalid(
                    "call.routes",
                    format!("{r:?}: a route name is 1-64 letters, digits, '-' or '_'"),
                ));
            }
            if self.call.routes[..i].contains(r) {
                return Err(invalid("call.routes", format!("{r:?} is listed twice")));
            }
        }
        range(
            "call.trace_max_messages",
            self.call.trace_max_messages,
            1,
            10_000,
        )?;
        range(
            "call.trace_keep_ended",
            self.call.trace_keep_ended,
            0,
            100_000,
        )?;
        let keepalive = self.registrar.keepalive_interval_s;
        if keepalive != 0 && !(MIN_KEEPALIVE_S..=MAX_KEEPALIVE_S).contains(&keepalive) {
            return Err(invalid(
                "registrar.keepalive_interval_s",
                format!(
                    "must be 0 (off) or between {MIN_KEEPALIVE_S} and {MAX_KEEPALIVE_S} \
                     (got {keepalive})"
                ),
            ));
        }
        // presence: intervals ordered. (A body limit above sip.max_message_size is allowed:
        // the smaller one is what applies.)
        let p = &self.presence;
        range(
            "presence.max_message_size",
            p.max_message_size,
            0,
            MAX_MESSAGE_SIZE,
        )?;
        range("presence.min_expires", p.min_expires, 1, u32::MAX)?;
        range(
            "presence.max_expires",
            p.max_expires,
            p.min_expires,
            MAX_TIMEOUT_S as u32,
        )?;
        range(
            "presence.default_expires",
            p.default_expires,
            p.min_expires,
            p.max_expires,
        )?;
        range(
            "presence.min_notify_interval_ms",
            p.min_notify_interval_ms,
            0,
            MAX_TIMER_MS,
        )?;
        if p.authenticate && self.registrar.users_file.trim().is_empty() {
            return Err(invalid(
                "presence.authenticate",
                "needs registrar.users_file (the users whose credentials are checked)",
            ));
        }
        range(
            "shutdown.drain_timeout_s",
            self.shutdown.drain_timeout_s,
            0,
            MAX_TIMEOUT_S,
        )?;
        Ok(())
    }
}

fn range<T: PartialOrd + fmt::Display>(
    key: &'static str,
    value: T,
    min: T,
    max: T,
) -> Result<(), Invalid> {
    if value < min {
        Err(invalid(
            key,
            format!("must be at least {min} (got {value})"),
        ))
    } else if value > max {
        Err(invalid(key, format!("must be at most {max} (got {value})")))
    } else {
        Ok(())
    }
}

/// Checks the form of a `sip.listen` entry: `udp:IP:PORT`, `tcp:IP:PORT` or
/// `memory:IP:PORT` (the in-process network), IPv6 in brackets (`tcp:[::1]:5060`). Host
/// names are refused: a listener binds an address.
pub fn validate_listen_entry(entry: &str) -> Result<(), String> {
    let Some((transport, addr)) = entry.split_once(':') else {
        return Err("expected TRANSPORT:IP:PORT, e.g. \"udp:127.0.0.1:5060\"".into());
    };
    if !matches!(transport, "udp" | "tcp" | "memory") {
        return Err(format!(
            "unknown transport {transport:?} (expected udp, tcp or memory)"
        ));
    }
    addr.parse::<SocketAddr>().map(|_| ()).map_err(|_| {
        format!("{addr:?} is not IP:PORT (IPv6 goes in brackets: \"{transport}:[::1]:5060\")")
    })
}

/// Checks `log.level`: a level name, or an `EnvFilter` directive string. A lone word that
/// is not a level is refused even though `EnvFilter` would read it as a target name:
/// `level = "verbose"` is far more likely a typo than a wish to log one target only.
fn validate_log_level(level: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let trimmed = level.trim();
    if trimmed.is_empty() {
        return Err("must not be empty (use trace, debug, info, warn or error)".into());
    }
    let is_directive = trimmed.contains(['=', ',', '[', ':']);
    if !is_directive && !LEVELS.contains(&trimmed.to_ascii_lowercase().as_str()) {
        return Err(format!(
            "unknown level {level:?} (use trace, debug, info, warn, error, or a filter \
             directive such as \"info,strowger=debug\")"
        ));
    }
    tracing_subscriber::EnvFilter::try_new(trimmed)
        .map(|_| ())
        .map_err(|e| format!("bad filter directive {level:?}: {e}"))
}

/// The `STROWGER_*` variables of this process (others are not ours to read).
fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    for (key, value) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if env_key(key).is_none() {
            continue;
        }
        match value.into_string() {
            Ok(value) => vars.push((key.to_string(), value)),
            Err(_) => {
                return Err(ConfigError {
                    file: format!("environment variable {key}"),
                    key: env_key(key).unwrap_or_default(),
                    line: None,
                    message: "value is not valid UTF-8".into(),
                })
            }
        }
    }
    Ok(vars)
}

/// The config key an environment variable sets (`STROWGER_SIP__TIMERS__T1_MS` →
/// `sip.timers.t1_ms`), or `None` if it has not our prefix. Mirrors what the `config`
/// crate does: lowercase, strip `strowger_`, turn `__` into `.`.
fn env_key(var: &str) -> Option<String> {
    let lower = var.to_lowercase();
    let prefix = format!("{}_", ENV_PREFIX.to_lowercase());
    let rest = lower.strip_prefix(&prefix)?;
    Some(rest.replace(ENV_SEPARATOR, "."))
}

fn load_from(
    path: Option<&Path>,
    env: &[(String, String)],
) -> Result<(Config, ConfigSource), ConfigError> {
    let (source, text) = read_source(path)?;
    let config = build(&source.label(), &text, env)?;
    Ok((config, source))
}

fn read_source(path: Option<&Path>) -> Result<(ConfigSource, String), ConfigError> {
    let cannot_read = |p: &Path, e: std::io::Error| ConfigError {
        file: p.display().to_string(),
        key: String::new(),
        line: None,
        message: format!("cannot read configuration file: {e}"),
    };
    match path {
        Some(p) => match std::fs::read_to_string(p) {
            Ok(text) => Ok((ConfigSource::File(p.to_path_buf()), text)),
            Err(e) => Err(cannot_read(p, e)),
        },
        None => {
            let p = Path::new(DEFAULT_PATH);
            match std::fs::read_to_string(p) {
                Ok(text) => Ok((ConfigSource::File(p.to_path_buf()), text)),
                // Only absence falls back; an unreadable default file is the operator's
                // file and must be reported, not replaced.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Ok((ConfigSource::Embedded, EMBEDDED.to_string()))
                }
                Err(e) => Err(cannot_read(p, e)),
            }
        }
    }
}

/// File text + environment → a validated configuration.
fn build(origin: &str, text: &str, env: &[(String, String)]) -> Result<Config, ConfigError> {
    // 1. The file on its own, with `toml`, for syntax errors, unknown keys and wrong types
    //    with their line numbers.
    toml::from_str::<Config>(text).map_err(|e| toml_error(origin, text, &e))?;

    // 2. Environment variable names: an unknown one is refused before merging, naming the
    //    variable, because after merging it would only be a key without a source.
    let overrides = env_overrides(env)?;

    // 3. Merge with the `config` crate.
    let env_map: config::Map<String, String> = env.iter().cloned().collect();
    let merged = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .separator(ENV_SEPARATOR)
                .prefix_separator("_")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("sip.listen")
                .with_list_parse_key("auth.algorithms")
                .with_list_parse_key("call.routes")
                .source(Some(env_map)),
        )
        .build()
        .map_err(|e| merge_error(origin, text, &overrides, e))?;
    let config: Config = merged
        .try_deserialize()
        .map_err(|e| merge_error(origin, text, &overrides, e))?;

    // 4. Values.
    config.check().map_err(|inv| {
        locate(
            origin,
            text,
            &overrides,
            inv.key,
            inv.needle.as_deref(),
            inv.message,
        )
    })?;
    config
        .check_huntgroups()
        .map_err(|(key, message, needle)| {
            locate(origin, text, &overrides, &key, needle.as_deref(), message)
        })?;
    Ok(config)
}

/// Maps each known key set by the environment to its variable name; refuses unknown ones.
fn env_overrides(env: &[(String, String)]) -> Result<BTreeMap<String, String>, ConfigError> {
    let known = known_keys();
    let mut out = BTreeMap::new();
    for (var, _) in env {
        let Some(key) = env_key(var) else { continue };
        if !known.contains(&key) {
            return Err(ConfigError {
                file: format!("environment variable {var}"),
                message: unknown_key_message(&key, &known),
                key,
                line: None,
            });
        }
        out.insert(key, var.clone());
    }
    Ok(out)
}

fn unknown_key_message(key: &str, known: &[String]) -> String {
    let below = format!("{key}.");
    let children: Vec<&str> = known
        .iter()
        .filter(|k| k.starts_with(&below))
        .map(String::as_str)
        .collect();
    if !children.is_empty() {
        return format!(
            "is a section, not a value; set its keys instead: {}",
            children.join(", ")
        );
    }
    // Suggest the keys of the same section, or all keys if the section is unknown too.
    let section = key
        .rsplit_once('.')
        .map(|(s, _)| format!("{s}."))
        .unwrap_or_default();
    let siblings: Vec<&str> = known
        .iter()
        .filter(|k| !section.is_empty() && k.starts_with(&section))
        .map(String::as_str)
        .collect();
    let list = if siblings.is_empty() {
        known.join(", ")
    } else {
        siblings.join(", ")
    };
    format!(
        "unknown key (levels are separated by a double underscore, e.g. \
         STROWGER_SIP__DOMAIN; known keys: {list})"
    )
}

/// Rewords serde / `config` messages that name Rust types, which mean nothing to an
/// operator, and says "key" where serde says "field".
fn friendly(message: &str) -> String {
    let mut m = message.trim().replacen("unknown field", "unknown key", 1);
    if let Some(at) = m.find("expected struct ") {
        m.truncate(at);
        m.push_str("expected a table ([section])");
    }
    // `config`'s wording for an unknown enum value, e.g. log.format = "JSON".
    if let Some(rest) = m.strip_prefix("enum ") {
        if let Some((_, variant)) = rest.split_once(" does not have variant constructor ") {
            m = format!("unknown variant `{variant}`");
        }
    }
    m
}

/// Every settable (leaf) key, dotted, e.g. `sip.timers.t1_ms`.
fn known_keys() -> Vec<String> {
    fn walk(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
        for (k, v) in table {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(t) => walk(&path, t, out),
                _ => out.push(path),
            }
        }
    }
    let mut out = Vec::new();
    // Serialising the defaults cannot fail (plain strings, integers, lists, tables); if it
    // ever did, no key would be known and every override would be refused loudly.
    if let Ok(table) = toml::Table::try_from(Config::default()) {
        walk("", &table, &mut out);
    }
    out
}

/// A `toml` error → a ConfigError with line and key (found from the span).
fn toml_error(origin: &str, text: &str, e: &toml::de::Error) -> ConfigError {
    let line = e.span().map(|s| line_of_offset(text, s.start));
    let key = line.and_then(|l| key_at_line(text, l)).unwrap_or_default();
    let message = friendly(e.message());
    ConfigError {
        file: origin.to_string(),
        key,
        line,
        message,
    }
}

/// A `config` crate error (only the environment can cause one once the file passed `toml`).
fn merge_error(
    origin: &str,
    text: &str,
    overrides: &BTreeMap<String, String>,
    e: config::ConfigError,
) -> ConfigError {
    let (key, mut message) = describe_merge_error(e);
    let key = key.unwrap_or_default();
    // `sip.listen[1]` → `sip.listen`: the source is the whole list.
    let base = key.split('[').next().unwrap_or("").to_string();
    if base == "log.format" && message.starts_with("unknown variant") {
        // The only enum; `config` does not list the choices, so say them here.
        message.push_str(", expected `text` or `json`");
    }
    locate(origin, text, overrides, &base, None, message)
}

fn describe_merge_error(e: config::ConfigError) -> (Option<String>, String) {
    match e {
        config::ConfigError::Type {
            unexpected,
            expected,
            key,
            ..
        } => (key, format!("expected {expected}, got {unexpected}")),
        config::ConfigError::At { error, key, .. } => {
            let (inner_key, message) = describe_merge_error(*error);
            (key.or(inner_key), message)
        }
        config::ConfigError::NotFound(key) => (Some(key), "missing".into()),
        config::ConfigError::Message(m) => (None, friendly(&m)),
        other => (None, other.to_string()),
    }
}

/// Builds the error for `key`, naming the environment variable if one set it, otherwise
/// the file and the key's line in it.
fn locate(
    origin: &str,
    text: &str,
    overrides: &BTreeMap<String, String>,
    key: &str,
    needle: Option<&str>,
    message: String,
) -> ConfigError {
    if let Some(var) = overrides.get(key) {
        return ConfigError {
            file: format!("environment variable {var}"),
            key: key.to_string(),
            line: None,
            message,
        };
    }
    let line = find_key_line(text, key).map(|l| match needle {
        // A list may span lines: point at the entry itself when it can be found.
        Some(n) => text
            .lines()
            .enumerate()
            .skip(l - 1)
            .find(|(_, s)| strip_comment(s).contains(n))
            .map(|(i, _)| i + 1)
            .unwrap_or(l),
        None => l,
    });
    ConfigError {
        file: origin.to_string(),
        key: key.to_string(),
        line,
        message,
    }
}

/// 1-based line of a byte offset.
fn line_of_offset(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// What a line of TOML is, as far as locating keys goes.
enum LineKind {
    /// `[a.b]` or `[[a.b]]`: the table path.
    Header(Vec<String>),
    /// `k = ...` or `a.k = ...`: the full key path.
    Key(Vec<String>),
}

/// Scans TOML text line by line (best effort: enough to find where a key is written; the
/// real parsing is done by `toml`). Returns (1-based line, kind) for headers and keys.
fn scan(text: &str) -> Vec<(usize, LineKind)> {
    let mut out = Vec::new();
    let mut table: Vec<String> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = strip_comment(raw).trim();
        if let Some(inner) = line.strip_prefix('[') {
            // A header, unless this is the continuation of a multi-line array of arrays,
            // which our schema does not have.
            let inner = inner.trim_start_matches('[');
            let inner = inner.split(']').next().unwrap_or("");
            table = key_parts(inner);
            out.push((i + 1, LineKind::Header(table.clone())));
        } else if let Some((k, _)) = line.split_once('=') {
            let k = k.trim();
            if k.is_empty() || k.starts_with('"') && k.matches('"').count() < 2 {
                continue;
            }
            let mut path = table.clone();
            path.extend(key_parts(k));
            out.push((i + 1, LineKind::Key(path)));
        }
    }
    out
}

/// Splits a dotted TOML key into its parts, unquoting quoted parts.
fn key_parts(s: &str) -> Vec<String> {
    s.split('.')
        .map(|p| p.trim().trim_matches('"').trim_matches('\'').to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// The line without its `#` comment (a `#` inside a string is kept).
fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match quote {
            Some('"') if escaped => escaped = false,
            Some('"') if c == '\\' => escaped = true,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '\'' => quote = Some(c),
            None if c == '#' => return &line[..i],
            None => {}
        }
    }
    line
}

/// The line where `key` (dotted) is written: its own `key = ` line, else an inline table or
/// header that contains it.
fn find_key_line(text: &str, key: &str) -> Option<usize> {
    let want: Vec<&str> = key.split('.').collect();
    let mut best: Option<(usize, usize)> = None; // (matched depth, line)
    for (line, kind) in scan(text) {
        let path = match &kind {
            LineKind::Header(p) | LineKind::Key(p) => p,
        };
        if path.len() > want.len() || path.iter().zip(&want).any(|(a, b)| a != b) {
            continue;
        }
        if path.len() == want.len() {
            return Some(line);
        }
        if best.is_none_or(|(depth, _)| path.len() > depth) {
            best = Some((path.len(), line));
        }
    }
    best.map(|(_, line)| line)
}

/// The key written on (or, inside a multi-line value, above) a 1-based line.
fn key_at_line(text: &str, line: usize) -> Option<String> {
    let mut found: Option<Vec<String>> = None;
    for (l, kind) in scan(text) {
        if l > line {
            break;
        }
        found = Some(match kind {
            LineKind::Header(p) | LineKind::Key(p) => p,
        });
    }
    found.map(|p| p.join("."))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Tests that change the process environment hold this, so they do not see each
    /// other's variables.
    static ENV_LOCK: Mutex<()> = Mutex::new(());

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn err_of(text: &str, vars: &[(&str, &str)]) -> ConfigError {
        build("test.toml", text, &env(vars)).expect_err("must be refused")
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::from_toml_str("", "empty.toml").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(
            c.sip.listen,
            vec!["udp:127.0.0.1:5060", "tcp:127.0.0.1:5060"]
        );
        assert_eq!(c.sip.domain, "localhost");
        assert_eq!(
            c.timers(),
            (
                Duration::from_millis(500),
                Duration::from_millis(4000),
                Duration::from_millis(5000)
            )
        );
        assert_eq!(c.sip.max_message_size, 65535);
        assert_eq!(
            c.sip.user_agent,
            format!("Strowger/{}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(c.sip.tcp_idle_timeout_s, 300);
        assert_eq!(c.http.listen, "127.0.0.1:9090");
        assert_eq!(c.log.level, "info");
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.script.path, "scripts/default.lua");
        assert_eq!(c.script.memory_limit_kb, 8192);
        assert_eq!(c.script.instruction_limit, 1_000_000);
        assert_eq!(c.script.vm_pool_size, 0);
        assert_eq!(c.shutdown.drain_timeout_s, 10);
        // Sections present but empty are the same.
        let c = Config::from_toml_str("[sip]\n[sip.timers]\n[log]\n", "t.toml").unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn defaults_are_valid() {
        assert!(Config::default().check().is_ok());
    }

    #[test]
    fn embedded_file_equals_defaults() {
        let c = Config::from_toml_str(EMBEDDED, "embedded").unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn shipped_file_lists_every_key_with_its_default() {
        // Every key is written out (so the file documents them all), except user_agent,
        // whose default carries the binary's version and so is shown commented out.
        let file: toml::Table = toml::from_str(EMBEDDED).unwrap();
        let mut defaults = toml::Table::try_from(Config::default()).unwrap();
        let sip = defaults
            .get_mut("sip")
            .and_then(|v| v.as_table_mut())
            .unwrap();
        assert!(sip.remove("user_agent").is_some());
        assert_eq!(file, defaults);
        assert!(EMBEDDED.contains("\n# user_agent = \"Strowger/<version>\"\n"));
        // And every key has its environment variable documented.
        for key in known_keys() {
            let var = format!("STROWGER_{}", key.to_uppercase().replace('.', "__"));
            assert!(EMBEDDED.contains(&var), "{var} not documented");
        }
    }

    #[test]
    fn env_overrides_scalar_nested_and_list() {
        let c = build(
            "t.toml",
            "[sip]\ndomain = \"file.example\"\n",
            &env(&[
                ("STROWGER_SIP__DOMAIN", "env-scalar.example"),
                ("STROWGER_SIP__TIMERS__T1_MS", "250"),
                ("STROWGER_SIP__LISTEN", "udp:127.0.0.1:5071,tcp:[::1]:5072"),
                ("STROWGER_LOG__FORMAT", "json"),
                ("OTHER_VAR", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.sip.domain, "env-scalar.example");
        assert_eq!(c.sip.timers.t1_ms, 250);
        assert_eq!(c.sip.timers.t2_ms, 4000);
        assert_eq!(c.sip.listen, vec!["udp:127.0.0.1:5071", "tcp:[::1]:5072"]);
        assert_eq!(c.log.format, LogFormat::Json);
        // A single list entry and a numeric-looking string.
        let c = build(
            "t.toml",
            "",
            &env(&[
                ("STROWGER_SIP__LISTEN", "tcp:127.0.0.1:5073"),
                ("STROWGER_SIP__DOMAIN", "12345"),
            ]),
        )
        .unwrap();
        assert_eq!(c.sip.listen, vec!["tcp:127.0.0.1:5073"]);
        assert_eq!(c.sip.domain, "12345");
    }

    #[test]
    fn process_env_overrides_via_load() {
        let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let dir = std::env::temp_dir().join(format!("strowger-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("env.toml");
        std::fs::write(&path, "[log]\nlevel = \"warn\"\n").unwrap();
        std::env::set_var("STROWGER_LOG__LEVEL", "debug");
        std::env::set_var("STROWGER_SIP__TIMERS__T2_MS", "4321");
        std::env::set_var(
            "STROWGER_SIP__LISTEN",
            "udp:127.0.0.1:5074,tcp:127.0.0.1:5075",
        );
        let loaded = Config::load_with_source(Some(&path));
        std::env::set_var("STROWGER_SIP__TIMERS__NOPE_MS", "1");
        let unknown = Config::load(Some(&path));
        for var in [
            "STROWGER_LOG__LEVEL",
            "STROWGER_SIP__TIMERS__T2_MS",
            "STROWGER_SIP__LISTEN",
            "STROWGER_SIP__TIMERS__NOPE_MS",
        ] {
            std::env::remove_var(var);
        }
        let _ = std::fs::remove_dir_all(&dir);

        let (c, source) = loaded.unwrap();
        assert_eq!(source, ConfigSource::File(path.clone()));
        assert_eq!(c.log.level, "debug");
        assert_eq!(c.sip.timers.t2_ms, 4321);
        assert_eq!(
            c.sip.listen,
            vec!["udp:127.0.0.1:5074", "tcp:127.0.0.1:5075"]
        );
        let e = unknown.unwrap_err();
        assert_eq!(e.file, "environment variable STROWGER_SIP__TIMERS__NOPE_MS");
        assert_eq!(e.key, "sip.timers.nope_ms");
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let _guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let e = Config::load(Some(Path::new("/nonexistent/strowger.toml"))).unwrap_err();
        assert_eq!(e.file, "/nonexistent/strowger.toml");
        assert!(e.message.contains("cannot read"), "{e}");
    }

    #[test]
    fn unknown_key_in_file_names_key_and_line() {
        let text = "# comment\n[sip]\ndomain = \"x\"\n\n[sip.timers]\nt1_ms = 100\nt3_ms = 7\n";
        let e = err_of(text, &[]);
        assert_eq!(e.key, "sip.timers.t3_ms");
        assert_eq!(e.line, Some(7));
        assert!(e.message.contains("unknown key"), "{e}");
        assert!(
            e.to_string().starts_with("test.toml:7: sip.timers.t3_ms: "),
            "{e}"
        );

        let e = err_of("[sip]\n\n[sipp]\ndomain = \"x\"\n", &[]);
        assert_eq!(e.line, Some(3), "{e}");
        assert_eq!(e.key, "sipp", "{e}");

        let e = err_of("[log]\nformat = \"text\"\nlevle = \"info\"\n", &[]);
        assert_eq!((e.key.as_str(), e.line), ("log.levle", Some(3)), "{e}");
    }

    #[test]
    fn unknown_env_key_is_an_error() {
        let e = err_of("", &[("STROWGER_SIP__DOMAIN_NAME", "x")]);
        assert_eq!(e.file, "environment variable STROWGER_SIP__DOMAIN_NAME");
        assert_eq!(e.key, "sip.domain_name");
        assert!(e.message.contains("unknown key"), "{e}");
        assert!(e.message.contains("sip.domain"), "{e}");
        // A single underscore between levels is the usual slip.
        let e = err_of("", &[("STROWGER_LOG_LEVEL", "debug")]);
        assert_eq!(e.key, "log_level");
        // A section is not a value.
        let e = err_of("", &[("STROWGER_SIP__TIMERS", "x")]);
        assert_eq!(e.key, "sip.timers");
        assert!(e.message.contains("is a section"), "{e}");
        assert!(e.message.contains("sip.timers.t1_ms"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = err_of("[sip.timers]\nt1_ms = 0\n", &[]);
        assert_eq!(
            e.to_string(),
            "test.toml:2: sip.timers.t1_ms: must be at least 1 (got 0)"
        );

        let e = err_of(
            "[sip]\nlisten = [\n  \"udp:127.0.0.1:5060\",\n  \"udp:nohost\",\n]\n",
            &[],
        );
        assert_eq!((e.key.as_str(), e.line), ("sip.listen", Some(4)), "{e}");
        assert!(e.message.contains("udp:nohost"), "{e}");

        let e = err_of("[log]\nformat = \"xml\"\n", &[]);
        assert_eq!((e.key.as_str(), e.line), ("log.format", Some(2)), "{e}");
        assert!(e.message.contains("xml"), "{e}");

        let e = err_of("[sip.timers]\nt1_ms = 1000\nt2_ms = 999\n", &[]);
        assert_eq!(
            (e.key.as_str(), e.line),
            ("sip.timers.t2_ms", Some(3)),
            "{e}"
        );

        let e = err_of("[sip]\ntimers = { t4_ms = 0 }\n", &[]);
        assert_eq!(
            (e.key.as_str(), e.line),
            ("sip.timers.t4_ms", Some(2)),
            "{e}"
        );

        let e = err_of("[sip]\nmax_message_size = 100\n", &[]);
        assert_eq!(e.key, "sip.max_message_size");

        let e = err_of("[sip]\nmax_message_size = \"big\"\n", &[]);
        assert_eq!(
            (e.key.as_str(), e.line),
            ("sip.max_message_size", Some(2)),
            "{e}"
        );

        let e = err_of("[http]\nlisten = \"localhost:80\"\n", &[]);
        assert_eq!((e.key.as_str(), e.line), ("http.listen", Some(2)), "{e}");

        let e = err_of("[http]\ntoken = \"two words\"\n", &[]);
        assert_eq!((e.key.as_str(), e.line), ("http.token", Some(2)), "{e}");

        let e = err_of("[log]\nlevel = \"verbose\"\n", &[]);
        assert_eq!(e.key, "log.level");
        let e = err_of("[log]\nlevel = \"info,strowger=[\"\n", &[]);
        assert_eq!(e.key, "log.level");

        let e = err_of("[sip]\nuser_agent = \"a\\r\\nX-Injected: 1\"\n", &[]);
        assert_eq!(e.key, "sip.user_agent");

        let e = err_of("[call]\nrecords_file = \"calls\\n.jsonl\"\n", &[]);
        assert_eq!(
            (e.key.as_str(), e.line),
            ("call.records_file", Some(2)),
            "{e}"
        );

        let e = err_of("sip = 5\n", &[]);
        assert_eq!((e.key.as_str(), e.line), ("sip", Some(1)), "{e}");
        assert!(e.message.ends_with("expected a table ([section])"), "{e}");

        let e = err_of("[sip\n", &[]);
        assert_eq!(e.line, Some(1), "{e}");
    }

    #[test]
    fn presence_section_is_checked_with_file_and_line() {
        let c = Config::from_toml_str("[presence]\nmax_message_size = 100\n", "t.toml").unwrap();
        assert_eq!(c.presence.max_message_size, 100);
        let e = Config::from_toml_str(
            "[presence]\nmin_expires = 60\ndefault_expires = 10\n",
            "t.toml",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.toml:3: presence.default_expires: must be at least 60 (got 10)"
        );
        let e = Config::from_toml_str("[presence]\nmax_message_sise = 1\n", "t.toml").unwrap_err();
        assert!(e.to_string().starts_with("t.toml:2:"), "{e}");
        let e = Config::from_toml_str("[presence]\nauthenticate = true\n", "t.toml").unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.toml:2: presence.authenticate: needs registrar.users_file (the users whose \
             credentials are checked)"
        );
    }

    #[test]
    fn keepalive_interval_is_off_or_in_range() {
        assert_eq!(Config::default().registrar.keepalive_interval_s, 0);
        for ok in [0, 5, 30, 3600] {
            let c = build(
                "t.toml",
                &format!("[registrar]\nkeepalive_interval_s = {ok}\n"),
                &[],
            )
            .unwrap();
            assert_eq!(c.registrar.keepalive_interval_s, ok);
        }
        for bad in [1, 4, 3601] {
            let e = err_of(
                &format!("[registrar]\nmin_expires = 60\nkeepalive_interval_s = {bad}\n"),
                &[],
            );
            assert_eq!(
                e.to_string(),
                format!(
                    "test.toml:3: registrar.keepalive_interval_s: must be 0 (off) or between \
                     5 and 3600 (got {bad})"
                )
            );
        }
        let c = build(
            "t.toml",
            "",
            &env(&[("STROWGER_REGISTRAR__KEEPALIVE_INTERVAL_S", "25")]),
        )
        .unwrap();
        assert_eq!(c.registrar.keepalive_interval_s, 25);
        let e = err_of("", &[("STROWGER_REGISTRAR__KEEPALIVE_INTERVAL_S", "2")]);
        assert_eq!(
            e.file,
            "environment variable STROWGER_REGISTRAR__KEEPALIVE_INTERVAL_S"
        );
    }

    #[test]
    fn bad_env_values_name_the_variable() {
        let e = err_of("", &[("STROWGER_SIP__TIMERS__T1_MS", "0")]);
        assert_eq!(
            e.to_string(),
            "environment variable STROWGER_SIP__TIMERS__T1_MS: sip.timers.t1_ms: \
             must be at least 1 (got 0)"
        );
        let e = err_of("", &[("STROWGER_SIP__TIMERS__T1_MS", "soon")]);
        assert_eq!(e.file, "environment variable STROWGER_SIP__TIMERS__T1_MS");
        assert_eq!(e.key, "sip.timers.t1_ms");
        let e = err_of("", &[("STROWGER_LOG__FORMAT", "xml")]);
        assert_eq!(e.file, "environment variable STROWGER_LOG__FORMAT", "{e}");
        assert_eq!(e.key, "log.format", "{e}");
        assert_eq!(
            e.message, "unknown variant `xml`, expected `text` or `json`",
            "{e}"
        );
        let e = err_of(
            "",
            &[("STROWGER_SIP__LISTEN", "udp:127.0.0.1:5076,udp:nohost")],
        );
        assert_eq!(e.file, "environment variable STROWGER_SIP__LISTEN");
        assert_eq!(e.key, "sip.listen");
    }

    #[test]
    fn listen_entries() {
        for ok in [
            "udp:127.0.0.1:5060",
            "tcp:0.0.0.0:0",
            "udp:[::1]:5060",
            "tcp:[2001:db8::1]:5080",
        ] {
            assert!(validate_listen_entry(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "udp",
            "udp:nohost",
            "udp:127.0.0.1",
            "sctp:127.0.0.1:5060",
            "UDP:127.0.0.1:5060",
            "udp:::1:5060",
            "udp:example.com:5060",
            "udp:127.0.0.1:70000",
        ] {
            assert!(validate_listen_entry(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn error_display_without_line_or_key() {
        let e = ConfigError {
            file: "f.toml".into(),
            key: String::new(),
            line: None,
            message: "gone".into(),
        };
        assert_eq!(e.to_string(), "f.toml: gone");
    }

    #[test]
    fn comment_stripping_keeps_hashes_in_strings() {
        assert_eq!(strip_comment("a = \"x#y\" # c"), "a = \"x#y\" ");
        assert_eq!(strip_comment("# all"), "");
        assert_eq!(strip_comment("a = 'x#y'"), "a = 'x#y'");
    }
}
