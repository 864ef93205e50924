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
//! | `[sip]` | `SipConfig` | `uas` (with `transport`'s checks of `listen`, `max_message_size`, `tcp_idle_timeout_s`) |
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
pub use crate::config_section::InvalidValue;
use crate::config_section::{check_range, MAX_TIMEOUT_S};
use crate::huntgroup::{check_huntgroups, HuntGroupConfig};
use crate::logging::LogConfig;
use crate::presence::PresenceSection;
use crate::registrar::RegistrarSection;
use crate::script::ScriptConfig;
use crate::storage::{RedisConfig, StorageConfig};
use crate::uas::SipConfig;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// The file read when no `--config` is given (relative to the working directory).
pub const DEFAULT_PATH: &str = "config/strowger.toml";

/// The shipped `config/strowger.toml`, used when [`DEFAULT_PATH`] does not exist.
const EMBEDDED: &str = include_str!("../config/strowger.toml");

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
        let sections: [(&str, Result<(), InvalidValue>); 12] = [
            ("sip", self.sip.check()),
            ("http", self.http.check()),
            ("log", self.log.check()),
            ("script", self.script.check()),
            ("call", self.call.check()),
            ("registrar", self.registrar.check()),
            ("storage", self.storage.check()),
            ("redis", self.redis.check()),
            ("auth", self.auth.check()),
            ("shutdown", self.shutdown.check()),
            ("huntgroups", check_huntgroups(&self.huntgroups)),
            ("presence", self.presence.check(has_users)),
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

/// The text and variables a document was built from, to turn a byte range back into a
/// file line or a variable name.
struct Sources<'a> {
    origin: &'a str,
    text: &'a str,
    env: &'a [(String, String)],
}

impl Sources<'_> {
    /// The range given to everything variable `i` sets: past the end of the file, one
    /// byte per variable.
    fn env_span(&self, i: usize) -> Range<usize> {
        let at = self.text.len() + 1 + i;
        at..at + 1
    }

    /// Where a byte offset points: `(file or variable, line)`.
    fn place(&self, offset: usize) -> (String, Option<usize>) {
        match offset.checked_sub(self.text.len() + 1) {
            Some(i) if i < self.env.len() => {
                (format!("environment variable {}", self.env[i].0), None)
            }
            _ => {
                let end = offset.min(self.text.len());
                let line = self.text.as_bytes()[..end]
                    .iter()
                    .filter(|b| **b == b'\n')
                    .count()
                    + 1;
                (self.origin.to_string(), Some(line))
            }
        }
    }

    /// A parse or type error at `span`; the key is the innermost one whose key or value
    /// covers the span's start.
    fn error_at(
        &self,
        doc: Option<&Spanned<DeTable<'_>>>,
        span: Option<Range<usize>>,
        message: &str,
    ) -> ConfigError {
        let message = friendly(message);
        let Some(span) = span else {
            return ConfigError {
                file: self.origin.to_string(),
                key: String::new(),
                line: None,
                message,
            };
        };
        let key = doc
            .and_then(|d| key_at(d.get_ref(), span.start))
            .unwrap_or_default();
        let (file, line) = self.place(span.start);
        ConfigError {
            file,
            key,
            line,
            message,
        }
    }

    /// A section's complaint, placed at the key (or list entry) it names; a key not written
    /// anywhere is placed at the nearest table that is.
    fn invalid(&self, doc: &Spanned<DeTable<'_>>, e: InvalidValue) -> ConfigError {
        let (file, line) = match span_of(doc.get_ref(), &e.key, e.index) {
            Some(span) => self.place(span.start),
            None => (self.origin.to_string(), None),
        };
        ConfigError {
            file,
            key: e.key,
            line,
            message: e.message,
        }
    }
}

/// The dotted path of the innermost key whose name or value covers `offset`.
fn key_at(table: &DeTable<'_>, offset: usize) -> Option<String> {
    for (k, v) in table {
        let inner = match v.get_ref() {
            DeValue::Table(t) => key_at(t, offset),
            _ => None,
        };
        if let Some(inner) = inner {
            return Some(format!("{}.{inner}", k.get_ref()));
        }
        if k.span().contains(&offset) || v.span().contains(&offset) {
            return Some(k.get_ref().to_string());
        }
    }
    None
}

/// The range to point at for `key` (dotted) and, for a list, its entry `index`: the entry,
/// else the key, else the deepest enclosing table that is written.
fn span_of(table: &DeTable<'_>, key: &str, index: Option<usize>) -> Option<Range<usize>> {
    let mut table = table;
    let mut found = None;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let Some((k, v)) = table.get_key_value(part) else {
            break;
        };
        found = Some(k.span());
        match v.get_ref() {
            DeValue::Table(t) => table = t,
            DeValue::Array(a) if parts.peek().is_none() => {
                if let Some(entry) = index.and_then(|i| a.get(i)) {
                    found = Some(entry.span());
                }
            }
            _ => {}
        }
        if parts.peek().is_none() {
            break;
        }
    }
    found
}

/// The defaults as a TOML table: the type of each key and the list of known keys.
fn defaults_table() -> toml::Table {
    // Serialising the defaults cannot fail (plain strings, integers, lists, tables); if it
    // ever did, no key would be known and every override would be refused loudly.
    toml::Table::try_from(Config::default()).unwrap_or_default()
}

fn lookup<'t>(table: &'t toml::Table, key: &str) -> Option<&'t toml::Value> {
    let (first, rest) = key.split_once('.').unwrap_or((key, ""));
    let v = table.get(first)?;
    match (rest, v) {
        ("", _) => Some(v),
        (rest, toml::Value::Table(t)) => lookup(t, rest),
        _ => None,
    }
}

/// Every settable (leaf) key, dotted, e.g. `sip.timers.t1_ms`.
fn known_keys(defaults: &toml::Table) -> Vec<String> {
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
    walk("", defaults, &mut out);
    out
}

/// An environment value as the type of the key's default: a number, a boolean or a list
/// where the default is one (a list is comma-separated), else the text itself. A value
/// that does not read as that type stays text, and deserializing it then names the
/// variable and the type it should have. List entries get `span`.
fn env_value<'i>(value: &'i str, default: &toml::Value, span: &Range<usize>) -> DeValue<'i> {
    let scalar = |value: &'i str, default: Option<&toml::Value>| {
        let want = default.map_or("string", toml::Value::type_str);
        match DeValue::parse(value.trim()).map(Spanned::into_inner) {
            Ok(v) if want != "string" && v.type_str() == want => v,
            _ => DeValue::String(Cow::Borrowed(value)),
        }
    };
    match default {
        toml::Value::Array(items) => DeValue::Array(
            value
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                // Entries take the type of the default's entries (text when it is empty).
                .map(|item| Spanned::new(span.clone(), scalar(item, items.first())))
                .collect(),
        ),
        other => scalar(value, Some(other)),
    }
}

/// Sets `key` (dotted) in the document to `value`, creating the tables on the way; every
/// part it writes gets `span` (the variable's). A key under a value that is not a table is
/// left alone: the file's own type error is reported for it.
fn override_value<'i>(table: &mut DeTable<'i>, key: &str, value: DeValue<'i>, span: Range<usize>) {
    let (first, rest) = key.split_once('.').unwrap_or((key, ""));
    let name = || Spanned::new(span.clone(), Cow::Owned(first.to_string()));
    if rest.is_empty() {
        // Re-inserted, so the key's range too is the variable's.
        table.remove(first);
        table.insert(name(), Spanned::new(span, value));
        return;
    }
    if !table.contains_key(first) {
        table.insert(
            name(),
            Spanned::new(span.clone(), DeValue::Table(DeTable::new())),
        );
    }
    if let Some(DeValue::Table(inner)) = table.get_mut(first).map(Spanned::get_mut) {
        override_value(inner, rest, value, span);
    }
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

/// Rewords serde messages that name Rust types, which mean nothing to an operator, and
/// says "key" where serde says "field".
fn friendly(message: &str) -> String {
    let mut m = message.trim().replacen("unknown field", "unknown key", 1);
    if let Some(at) = m.find("expected struct ") {
        m.truncate(at);
        m.push_str("expected a table ([section])");
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logging::LogFormat;
    use std::sync::Mutex;
    use std::time::Duration;

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
        let timers = c.sip.timers.to_timers();
        assert_eq!(
            (timers.t1, timers.t2, timers.t4),
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
        for key in known_keys(&defaults_table()) {
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
    fn huntgroup_errors_name_file_line_and_nested_key() {
        let ok = "[huntgroups.support]\nstrategy = \"weighted\"\nmembers = [\"1001\", \"sip:b@example.com\"]\nweights = [3, 1]\n";
        let c = Config::from_toml_str(ok, "t.toml").unwrap();
        assert_eq!(c.huntgroups["support"].weights, vec![3, 1]);
        assert_eq!(c.huntgroups["support"].ring_timeout, 15);
        for (text, want) in [
            (
                "[huntgroups.support]\nmembers = [\"1001\"]\nstrategy = \"ring-some\"\n",
                "t.toml:3: huntgroups.support.strategy: unknown strategy",
            ),
            (
                "[huntgroups.support]\nstrategy = \"linear\"\n",
                "t.toml:1: huntgroups.support.members: at least one member",
            ),
            (
                "[huntgroups.support]\nmembers = [\n  \"1001\",\n  \"sip:bad uri\",\n]\n",
                "t.toml:4: huntgroups.support.members: bad member",
            ),
            (
                "[huntgroups.support]\nmembers = [\"1001\", \"1002\"]\nweights = [1]\n",
                "t.toml:3: huntgroups.support.weights: one weight per member",
            ),
            (
                "[huntgroups.support]\nmembers = [\"1001\"]\nring_timeout = 0\n",
                "t.toml:3: huntgroups.support.ring_timeout: must be between 1",
            ),
            (
                "[huntgroups.Support]\nmembers = [\"1001\"]\n",
                "huntgroups.Support: a group name is lower-case",
            ),
            (
                "[huntgroups.support]\nmembers = [\"1001\"]\nring_time = 3\n",
                "t.toml:3: huntgroups.support.ring_time: unknown key",
            ),
        ] {
            let e = Config::from_toml_str(text, "t.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{text}\n→ {e}\nwanted {want}");
        }
    }

    #[test]
    fn each_section_names_file_line_and_key() {
        // One bad value per section, each after a first line that is fine, so the line
        // number is the key's own and not the section header's.
        for (text, want) in [
            (
                "[sip]\ndomain = \"x\"\ntcp_idle_timeout_s = 0\n",
                "t.toml:3: sip.tcp_idle_timeout_s: must be at least 1",
            ),
            (
                "[sip.timers]\nt1_ms = 500\nt4_ms = 0\n",
                "t.toml:3: sip.timers.t4_ms: must be at least 1",
            ),
            (
                "[http]\ntoken = \"\"\nlisten = \"nowhere\"\n",
                "t.toml:3: http.listen: \"nowhere\" is not IP:PORT",
            ),
            (
                "[log]\nformat = \"json\"\nlevel = \"loud\"\n",
                "t.toml:3: log.level: unknown level",
            ),
            (
                "[script]\npath = \"x.lua\"\ninstruction_limit = 0\n",
                "t.toml:3: script.instruction_limit: must be at least 1",
            ),
            (
                "[call]\ntrace = true\nroutes = [\"pstn\",\n  \"no spaces\"]\n",
                "t.toml:4: call.routes: \"no spaces\": a route name",
            ),
            (
                "[registrar]\nmin_expires = 60\nunknown_aor_status = 500\n",
                "t.toml:3: registrar.unknown_aor_status: must be 404 or 403",
            ),
            (
                "[registrar]\nstore = \"disk\"\n",
                "t.toml:2: registrar.store: unknown variant `disk`",
            ),
            (
                "[storage]\ndir = \"\"\n",
                "t.toml:2: storage.dir: must not be empty",
            ),
            (
                "[redis]\nurl = \"http://x/\"\n",
                "t.toml:2: redis.url: \"http://x/\" is not a Redis URL",
            ),
            (
                "[auth]\nnonce_ttl_s = 60\nalgorithms = [\"MD5\", \"SHA-1\"]\n",
                "t.toml:3: auth.algorithms: unknown algorithm \"SHA-1\"",
            ),
            (
                "[shutdown]\n\ndrain_timeout_s = 86401\n",
                "t.toml:3: shutdown.drain_timeout_s: must be at most 86400",
            ),
            (
                "[presence]\nmin_expires = 60\nmax_expires = 30\n",
                "t.toml:3: presence.max_expires: must be at least 60",
            ),
        ] {
            let e = Config::from_toml_str(text, "t.toml")
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(want), "{text}\n→ {e}\nwanted {want}");
        }
    }

    #[test]
    fn unknown_keys_and_wrong_types_in_inline_tables_and_lists() {
        let e = err_of("[sip]\ntimers = { t1_ms = 100, t5_ms = 1 }\n", &[]);
        assert_eq!(
            (e.key.as_str(), e.line),
            ("sip.timers.t5_ms", Some(2)),
            "{e}"
        );
        assert!(e.message.starts_with("unknown key `t5_ms`"), "{e}");
        let e = err_of(
            "[sip]\ndomain = \"x\"\nlisten = [\n  \"udp:127.0.0.1:5060\",\n  5,\n]\n",
            &[],
        );
        assert_eq!((e.key.as_str(), e.line), ("sip.listen", Some(5)), "{e}");
        let e = err_of(
            "[huntgroups.sales]\nmembers = [\"1001\"]\n[huntgroups.sales.extra]\n",
            &[],
        );
        assert_eq!(e.key, "huntgroups.sales.extra", "{e}");
        assert_eq!(e.line, Some(3), "{e}");
    }

    #[test]
    fn env_values_take_the_type_of_the_default() {
        let c = build(
            "t.toml",
            "",
            &env(&[
                ("STROWGER_CALL__TRACE", "false"),
                ("STROWGER_CALL__ROUTES", "pstn, sip"),
                ("STROWGER_AUTH__ALGORITHMS", "MD5"),
                ("STROWGER_HTTP__TOKEN", "123"),
            ]),
        )
        .unwrap();
        assert!(!c.call.trace);
        assert_eq!(c.call.routes, vec!["pstn", "sip"]);
        assert_eq!(c.auth.algorithms, vec!["MD5"]);
        assert_eq!(c.http.token, "123");
        // An env value over a file value: the error names the variable, not the file.
        let e = err_of(
            "[call]\ntrace = true\n",
            &[("STROWGER_CALL__TRACE", "maybe")],
        );
        assert_eq!(e.file, "environment variable STROWGER_CALL__TRACE", "{e}");
        assert_eq!((e.key.as_str(), e.line), ("call.trace", None), "{e}");
        let e = err_of(
            "[call]\nroutes = [\"a\"]\n",
            &[("STROWGER_CALL__ROUTES", "ok,not ok")],
        );
        assert_eq!(
            e.to_string(),
            "environment variable STROWGER_CALL__ROUTES: call.routes: \"not ok\": a route \
             name is 1-64 letters, digits, '-' or '_'"
        );
        // Hunt groups are not settable from the environment.
        let e = err_of("", &[("STROWGER_HUNTGROUPS__SALES__MEMBERS", "1001")]);
        assert!(e.message.contains("unknown key"), "{e}");
    }
}
