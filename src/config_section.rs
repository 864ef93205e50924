//! What every section of the configuration file shares: the error a section's `check()`
//! returns, and the range check most values need.
//!
//! Owns: the contract between a layer's config struct and the loader. Each layer keeps its
//! own section (struct, defaults, validation) in its `config.rs`; `config` parses the file
//! and the environment, composes the sections and turns an [`InvalidValue`] into an error
//! that names the file, line and key. This module imports nothing of the crate, so every
//! layer can use it while `config` imports the layers.

use std::fmt;

/// A value that failed its section's check: the key relative to the section (`t1_ms`,
/// `timers.t1_ms`, `sales.members` for a hunt group), and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct InvalidValue {
    /// Dotted key below the section.
    pub key: String,
    /// For a list value, the entry at fault (0-based), so the error can point at its line.
    pub index: Option<usize>,
    /// What is wrong, for the operator.
    pub message: String,
}

impl InvalidValue {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> InvalidValue {
        InvalidValue {
            key: key.into(),
            index: None,
            message: message.into(),
        }
    }

    /// The same problem about entry `index` of the list `key`.
    pub fn entry(key: impl Into<String>, index: usize, message: impl Into<String>) -> Self {
        InvalidValue {
            index: Some(index),
            ..InvalidValue::new(key, message)
        }
    }

    /// The same problem seen from the enclosing table `prefix` (`timers` → `timers.t1_ms`).
    pub fn within(mut self, prefix: &str) -> InvalidValue {
        self.key = if self.key.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}.{}", self.key)
        };
        self
    }
}

/// Checks `min <= value <= max`, naming `key` when it is not.
/// Checks `min_expires`, `max_expires` and `default_expires` of a section that grants
/// intervals (REGISTER, SUBSCRIBE, PUBLISH): `1 <= min <= max <= ceiling` and the default
/// inside `[min, max]`, or a request without an interval would be refused or cut.
pub fn check_expires(min: u32, max: u32, default: u32, ceiling: u32) -> Result<(), InvalidValue> {
    check_range("min_expires", min, 1, ceiling)?;
    check_range("max_expires", max, min, ceiling)?;
    check_range("default_expires", default, min, max)
}

pub fn check_range<T: PartialOrd + fmt::Display>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), InvalidValue> {
    if value < min {
        Err(InvalidValue::new(
            key,
            format!("must be at least {min} (got {value})"),
        ))
    } else if value > max {
        Err(InvalidValue::new(
            key,
            format!("must be at most {max} (got {value})"),
        ))
    } else {
        Ok(())
    }
}

/// Upper bound of second-valued timeouts in every section (a day), so deadline arithmetic
/// cannot overflow and a typo in the millions is caught.
pub const MAX_TIMEOUT_S: u64 = 86_400;
/// Upper bound of millisecond timers (an hour): the transaction layer multiplies T1 by 64,
/// and a typo in the millions would keep state alive for days.
pub const MAX_TIMER_MS: u64 = 3_600_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_and_prefix() {
        assert!(check_range("k", 5, 1, 10).is_ok());
        let e = check_range("k", 0, 1, 10).unwrap_err();
        assert_eq!(e.to_string(), "k: must be at least 1 (got 0)");
        let e = check_range("k", 11, 1, 10).unwrap_err().within("timers");
        assert_eq!(e.to_string(), "timers.k: must be at most 10 (got 11)");
        assert_eq!(InvalidValue::new("", "m").within("g").key, "g");
    }
}
