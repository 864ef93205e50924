//! Server configuration: loads the TOML file and `STROWGER_*` environment overrides, and
//! composes the sections that the layers own.
//!
//! Owns: where values come from, the shape of the whole (`Config`: one field per section)
//! and the start-up errors, which name the file, line and key. Must not touch: what a
//! section holds, its defaults or what a valid value is: each layer owns its section's
//! struct, `Default` and `check()` in its `config.rs` (see the table below) and returns a
//! [`InvalidValue`] naming the key below its section. The layers never import this module
//! (it imports them).
//!
//! Sources, later ones winning:
//! 1. the TOML file: `--config PATH`, or `config/strowger.toml` in the working directory,
//!    or, when that default file is absent, the copy of `config/strowger.toml` built into
//!    the binary (so the server runs from any directory). An explicit path that cannot be
//!    read is an error, never a silent fallback.
//! 2. environment variables `STROWGER_<SECTION>__<KEY>` (double underscore between
//!    levels, names case-insensitive), e.g. `STROWGER_SIP__DOMAIN=example.com`,
//!    `STROWGER_SIP__TIMERS__T1_MS=250`; a list is comma-separated:
//!    `STROWGER_SIP__LISTEN="udp:127.0.0.1:5070,tcp:127.0.0.1:5070"`. A value is read as the
//!    type of the key's default (so `STROWGER_SIP__DOMAIN=12345` is a domain, not a number).
//!
//! Unknown keys (in the file or as `STROWGER_*` variables) and bad values stop start-up
//! with a [`ConfigError`] that names the file (or variable), the key, the line where it can
//! be found, and the problem: a typo must never fall back to a default silently.
//!
//! Sections (defaults in each struct's `Default`; `config/strowger.toml` lists every key
//! with its default and is checked against them):
//!
//! | section | struct | owner |
//! |---------|--------|-------|
//! | `[sip]` | `SipConfig` | `uas` (with `transport`'s checks of `listen`, `max_message_size`, `tcp_idle_timeout_s`, `workers`) |
//! | `[sip.timers]` | `TimersConfig` | `transaction` |
//! | `[http]` | `HttpConfig` | `admin` |
//! | `[log]` | `LogConfig` | `logging` |
//! | `[script]` | `ScriptConfig` | `script` |
//! | `[call]` | `CallConfig` | `b2bua` |
//! | `[registrar]` | `RegistrarSection` | `registrar` |
//! | `[storage]`, `[redis]` | `StorageConfig`, `RedisConfig` | `storage` |
//! | `[auth]` | `AuthConfig` | `auth` |
//! | `[shutdown]` | [`ShutdownConfig`] | here (read by `server`, which imports this module) |
//! | `[huntgroups.<name>]` | `HuntGroupConfig` | `huntgroup` (not settable from the environment) |
//! | `[presence]` | `PresenceSection` | `presence` |
//! | `[dns]` | `DnsConfig` | `transport` (the RFC 3263 locator's resolver) |
//! | `[tls]`, `[ws]` | `TlsConfig`, `WsConfig` | `transport` (with its check that a `tls:`/`wss:` entry of `sip.listen` has `tls.cert`) |
//! | `[trunks.<name>]` | `TrunkConfig` | `trunk` (not settable from the environment) |
//! | `[cluster]` | `ClusterConfig` | `cluster` |
//!
//! How a line is found: the file is parsed once into `toml`'s spanned document
//! ([`toml::de::DeTable`]: every key and value with its byte range), environment values are
//! put into that document with ranges past the end of the file (each range names its
//! variable), and `Config` is deserialized from it. A parse or type error carries the range
//! of what it is about; a section's [`InvalidValue`] names a key, which is looked up in the
//! document. Either way the range gives the file line (or the variable) and the key.

use crate::admin::HttpConfig;
use crate::auth::AuthConfig;
use crate::b2bua::CallConfig;
use crate::cluster::ClusterConfig;
pub use crate::config_section::InvalidValue;
use crate::config_section::{check_range, MAX_TIMEOUT_S};
use crate::huntgroup::{check_huntgroups, HuntGroupConfig};
use crate::logging::LogConfig;
use crate::presence::PresenceSection;
use crate::registrar::RegistrarSection;
use crate::script::ScriptConfig;
use crate::storage::{RedisConfig, StorageConfig};
use crate::transport::config::{check_tls_listeners, DnsConfig, TlsConfig, WsConfig};
use crate::trunk::{check_trunks, TrunkConfig};
use crate::uas::SipConfig;
use document::{
    defaults_table, env_value, known_keys, lookup, override_value, unknown_key_message, Sources,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use toml::de::DeTable;

mod document;
#[cfg(test)]
mod tests;

/// The file read when no `--config` is given (relative to the working directory).
pub const DEFAULT_PATH: &str = "config/strowger.toml";

/// The shipped `config/strowger.toml`, used when [`DEFAULT_PATH`] does not exist.
const EMBEDDED: &str = include_str!("../../config/strowger.toml");

/// Prefix of the environment variables that override file values.
const ENV_PREFIX: &str = "STROWGER";
/// Separates levels in an environment variable name (`STROWGER_SIP__TIMERS__T1_MS`).
const ENV_SEPARATOR: &str = "__";

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

/// The whole configuration: one field per section. Every field has a default, so an empty
/// file is valid.
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
    pub dns: DnsConfig,
    pub tls: TlsConfig,
    pub ws: WsConfig,
    /// `[trunks.<name>]`: SIP trunks to carriers (see [`TrunkConfig`]).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub trunks: BTreeMap<String, TrunkConfig>,
    pub cluster: ClusterConfig,
}

/// `[shutdown]`: the graceful stop. It lives here rather than in `server`, which reads
/// it, because `server` imports this module and a section there would make a cycle.
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

impl ShutdownConfig {
    pub fn check(&self) -> Result<(), InvalidValue> {
        check_range("drain_timeout_s", self.drain_timeout_s, 0, MAX_TIMEOUT_S)
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
        let (source, text) = read_source(path)?;
        let config = build(&source.label(), &text, &env)?;
        Ok((config, source))
    }

    /// Parses and validates TOML text alone (no environment). `origin` names the text in
    /// errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
        build(origin, text, &[])
    }

    /// Checks every section; the first problem, its key made absolute (`sip.timers.t1_ms`).
    fn check(&self) -> Result<(), InvalidValue> {
        let has_users = !self.registrar.users_file.trim().is_empty();
        let sections: [(&str, Result<(), InvalidValue>); 19] = [
            ("sip", self.sip.check()),
            ("http", self.http.check()),
            ("log", self.log.check()),
            ("script", self.script.check()),
            ("script", self.script.check_with_workers(self.sip.workers)),
            ("call", self.call.check()),
            ("registrar", self.registrar.check()),
            ("storage", self.storage.check()),
            ("redis", self.redis.check()),
            ("auth", self.auth.check()),
            ("shutdown", self.shutdown.check()),
            ("huntgroups", check_huntgroups(&self.huntgroups)),
            ("presence", self.presence.check(has_users)),
            ("dns", self.dns.check()),
            ("tls", self.tls.check()),
            // After [tls]'s own check: a listener's error names the entry, not a key.
            ("sip", check_tls_listeners(&self.sip.listen, &self.tls)),
            ("ws", self.ws.check()),
            ("trunks", check_trunks(&self.trunks)),
            ("cluster", self.cluster.check()),
        ];
        for (section, result) in sections {
            result.map_err(|e| e.within(section))?;
        }
        Ok(())
    }
}

/// The `STROWGER_*` variables of this process (others are not ours to read).
fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut vars = Vec::new();
    for (key, value) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let Some(config_key) = env_key(key) else {
            continue;
        };
        match value.into_string() {
            Ok(value) => vars.push((key.to_string(), value)),
            Err(_) => {
                return Err(ConfigError {
                    file: format!("environment variable {key}"),
                    key: config_key,
                    line: None,
                    message: "value is not valid UTF-8".into(),
                })
            }
        }
    }
    Ok(vars)
}

/// The config key an environment variable sets (`STROWGER_SIP__TIMERS__T1_MS` →
/// `sip.timers.t1_ms`), or `None` if it has not our prefix.
fn env_key(var: &str) -> Option<String> {
    let lower = var.to_lowercase();
    let prefix = format!("{}_", ENV_PREFIX.to_lowercase());
    let rest = lower.strip_prefix(&prefix)?;
    Some(rest.replace(ENV_SEPARATOR, "."))
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
    let sources = Sources { origin, text, env };
    // 1. The file, parsed once with positions.
    let mut doc =
        DeTable::parse(text).map_err(|e| sources.error_at(None, e.span(), e.message()))?;
    // 2. The environment, put into the same document (unknown names refused first).
    let defaults = defaults_table();
    for (i, (var, value)) in env.iter().enumerate() {
        let Some(key) = env_key(var) else { continue };
        // Only values can be set: a table's name is refused like an unknown key, with
        // its keys listed.
        let Some(default) = lookup(&defaults, &key).filter(|v| !v.is_table()) else {
            return Err(ConfigError {
                file: format!("environment variable {var}"),
                message: unknown_key_message(&key, &known_keys(&defaults)),
                key,
                line: None,
            });
        };
        let span = sources.env_span(i);
        let value = env_value(value, default, &span);
        override_value(doc.get_mut(), &key, value, span);
    }
    // 3. Types and unknown keys.
    let config = Config::deserialize(toml::de::Deserializer::from(doc.clone()))
        .map_err(|e| sources.error_at(Some(&doc), e.span(), e.message()))?;
    // 4. Values.
    config.check().map_err(|e| sources.invalid(&doc, e))?;
    Ok(config)
}
