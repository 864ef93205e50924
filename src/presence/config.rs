//! `[presence]`: SUBSCRIBE/NOTIFY, PUBLISH and MESSAGE (RFC 6665, 3903, 3428).

use super::PresenceConfig;
use crate::config_section::{
    check_expires, check_range, InvalidValue, MAX_TIMEOUT_S, MAX_TIMER_MS,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Largest `max_message_size`: the transport's own upper bound of a message.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// `[presence]`.
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

impl PresenceSection {
    /// `has_users`: whether `registrar.users_file` is set, which `authenticate` needs.
    /// (A body limit above `sip.max_message_size` is allowed: the smaller one applies.)
    pub fn check(&self, has_users: bool) -> Result<(), InvalidValue> {
        check_range("max_message_size", self.max_message_size, 0, MAX_BODY)?;
        check_expires(
            self.min_expires,
            self.max_expires,
            self.default_expires,
            MAX_TIMEOUT_S as u32,
        )?;
        check_range(
            "min_notify_interval_ms",
            self.min_notify_interval_ms,
            0,
            MAX_TIMER_MS,
        )?;
        if self.authenticate && !has_users {
            return Err(InvalidValue::new(
                "authenticate",
                "needs registrar.users_file (the users whose credentials are checked)",
            ));
        }
        Ok(())
    }

    /// The policy as the presence core takes it, for `domain` (`sip.domain`).
    pub fn policy(&self, domain: &str) -> PresenceConfig {
        PresenceConfig {
            domain: domain.to_ascii_lowercase(),
            max_message_size: self.max_message_size,
            min_expires: self.min_expires,
            max_expires: self.max_expires,
            default_expires: self.default_expires,
            min_notify_interval: Duration::from_millis(self.min_notify_interval_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(f: impl FnOnce(&mut PresenceSection)) -> InvalidValue {
        let mut c = PresenceSection::default();
        f(&mut c);
        c.check(false).unwrap_err()
    }

    #[test]
    fn defaults_are_valid_and_the_cores() {
        assert!(PresenceSection::default().check(false).is_ok());
        assert_eq!(
            PresenceSection::default().policy("localhost"),
            PresenceConfig::default()
        );
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = bad(|c| c.default_expires = 10);
        assert_eq!(
            e.to_string(),
            "default_expires: must be at least 60 (got 10)"
        );
        assert_eq!(bad(|c| c.max_expires = 59).key, "max_expires");
        assert_eq!(bad(|c| c.min_expires = 0).key, "min_expires");
        assert_eq!(
            bad(|c| c.min_notify_interval_ms = MAX_TIMER_MS + 1).key,
            "min_notify_interval_ms"
        );
        assert_eq!(bad(|c| c.authenticate = true).key, "authenticate");
        let with_users = PresenceSection {
            authenticate: true,
            ..PresenceSection::default()
        };
        assert!(with_users.check(true).is_ok());
    }
}
