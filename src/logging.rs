//! Process-wide logging: installs the `tracing` subscriber once, at start-up.
//!
//! Owns: the global subscriber (filter, format, output). Must not touch: what is logged;
//! each layer emits its own events with `tracing` macros.
//!
//! Config keys: `log.level` (a level or an `EnvFilter` directive string; `RUST_LOG`, when
//! set and non-empty, wins so an operator can turn up one module without editing the
//! file), `log.format` (`text` or `json`, one JSON object per line). Output goes to
//! stderr, leaving stdout to command output such as `strowger check`.

use crate::config::{LogConfig, LogFormat};
use anyhow::Context as _;
use std::io::IsTerminal as _;
use tracing_subscriber::EnvFilter;

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
    fn bad_filters_are_errors() {
        let e = filter(&level("info"), Some("strowger=[")).unwrap_err();
        assert!(e.to_string().contains("RUST_LOG"), "{e}");
        let e = filter(&level("info,x=["), None).unwrap_err();
        assert!(e.to_string().contains("log.level"), "{e}");
    }
}
