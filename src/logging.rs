//! Process-wide logging: installs the `tracing` subscriber once, at start-up.
//!
//! Owns: the global subscriber (filter, format, output). Must not touch: what is logged;
//! each layer emits its own events with `tracing` macros.
//!
//! Config keys: `log.level` (a level or an `EnvFilter` directive string; `RUST_LOG`, when
//! set and non-empty, wins so an operator can turn up one module without editing the
//! file), `log.format` (`text` or `json`, one JSON object per line). Output goes to
//! stderr, leaving stdout to command output such as `strowger check`. The section's struct
//! ([`LogConfig`]), defaults and checks live here.

use crate::config_section::InvalidValue;
use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use std::io::IsTerminal as _;
use tracing_subscriber::EnvFilter;

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

impl LogConfig {
    /// `level`: a level name, or an `EnvFilter` directive string. A lone word that is not a
    /// level is refused even though `EnvFilter` would read it as a target name:
    /// `level = "verbose"` is far more likely a typo than a wish to log one target only.
    pub fn check(&self) -> Result<(), InvalidValue> {
        const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
        let level = &self.level;
        let trimmed = level.trim();
        let bad = |m: String| Err(InvalidValue::new("level", m));
        if trimmed.is_empty() {
            return bad("must not be empty (use trace, debug, info, warn or error)".into());
        }
        let is_directive = trimmed.contains(['=', ',', '[', ':']);
        if !is_directive && !LEVELS.contains(&trimmed.to_ascii_lowercase().as_str()) {
            return bad(format!(
                "unknown level {level:?} (use trace, debug, info, warn, error, or a filter \
                 directive such as \"info,strowger=debug\")"
            ));
        }
        match EnvFilter::try_new(trimmed) {
            Ok(_) => Ok(()),
            Err(e) => bad(format!("bad filter directive {level:?}: {e}")),
        }
    }
}

/// Installs the global subscriber. Call it once per process; a second call (or a
/// subscriber installed by someone else first) returns an error instead of panicking.
pub fn init(cfg: &LogConfig) -> anyhow::Result<()> {
    let filter = filter(cfg, std::env::var("RUST_LOG").ok().as_deref())?;
    // Colour codes only help a person at a terminal; in files and journald they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match cfg.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("cannot install the logger (already installed?): {e}"))
}

/// The filter: `RUST_LOG` when set and non-empty, else `log.level`. A bad `RUST_LOG` is an
/// error rather than ignored, because the operator set it on purpose.
fn filter(cfg: &LogConfig, rust_log: Option<&str>) -> anyhow::Result<EnvFilter> {
    match rust_log.map(str::trim).filter(|s| !s.is_empty()) {
        Some(directives) => EnvFilter::try_new(directives)
            .with_context(|| format!("RUST_LOG={directives:?} is not a valid log filter")),
        None => EnvFilter::try_new(cfg.level.trim())
            .with_context(|| format!("log.level {:?} is not a valid log filter", cfg.level)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(level: &str) -> LogConfig {
        LogConfig {
            level: level.into(),
            ..LogConfig::default()
        }
    }

    #[test]
    fn filter_comes_from_config_unless_rust_log_is_set() {
        let f = filter(&level("warn"), None).unwrap();
        assert_eq!(f.to_string(), "warn");
        let f = filter(&level("warn"), Some("")).unwrap();
        assert_eq!(f.to_string(), "warn");
        let f = filter(&level("warn"), Some("strowger=trace")).unwrap();
        assert_eq!(f.to_string(), "strowger=trace");
        let f = filter(&level("info,strowger::sip=debug"), None).unwrap();
        assert!(f.to_string().contains("strowger::sip=debug"));
    }

    #[test]
    fn levels_are_checked() {
        assert!(LogConfig::default().check().is_ok());
        assert!(level("info,strowger=debug").check().is_ok());
        assert!(level("WARN").check().is_ok());
        for bad in ["", "verbose", "info,strowger=["] {
            assert_eq!(level(bad).check().unwrap_err().key, "level", "{bad}");
        }
    }

    #[test]
    fn bad_filters_are_errors() {
        let e = filter(&level("info"), Some("strowger=[")).unwrap_err();
        assert!(e.to_string().contains("RUST_LOG"), "{e}");
        let e = filter(&level("info,x=["), None).unwrap_err();
        assert!(e.to_string().contains("log.level"), "{e}");
    }
}
