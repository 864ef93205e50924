//! `[registrar]`: REGISTER policy (RFC 3261 10.3), where bindings are kept, who may
//! register, and keep-alive pings of registered contacts.

use super::RegistrarConfig;
use crate::config_section::{check_expires, InvalidValue, MAX_TIMEOUT_S};
use serde::{Deserialize, Serialize};

/// Bounds of `keepalive_interval_s` when it is not 0 (off). Below 5 s the pings of many
/// phones become a load of their own (and a ping of a silent phone lasts timer F, 32 s);
/// above an hour they neither keep a NAT mapping open (RFC 4787 REQ-5 asks for at least 2
/// minutes, many NATs keep less) nor find a dead phone before its registration
/// (`max_expires` defaults to an hour) would lapse anyway.
const MIN_KEEPALIVE_S: u64 = 5;
const MAX_KEEPALIVE_S: u64 = 3600;

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

/// `[registrar]`.
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
    /// Bindings one address of record may have; a REGISTER that would go past it gets 503
    /// (0: no bound).
    pub max_contacts: usize,
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
            max_contacts: 10,
        }
    }
}

impl RegistrarSection {
    pub fn check(&self) -> Result<(), InvalidValue> {
        // 10.3 step 7: the interval asked for is cut to [min, max]; the default must lie
        // inside, or a REGISTER without one would be refused or cut.
        check_expires(
            self.min_expires,
            self.max_expires,
            self.default_expires,
            MAX_TIMEOUT_S as u32,
        )?;
        if !matches!(self.unknown_aor_status, 403 | 404) {
            return Err(InvalidValue::new(
                "unknown_aor_status",
                format!("must be 404 or 403 (got {})", self.unknown_aor_status),
            ));
        }
        let keepalive = self.keepalive_interval_s;
        if keepalive != 0 && !(MIN_KEEPALIVE_S..=MAX_KEEPALIVE_S).contains(&keepalive) {
            return Err(InvalidValue::new(
                "keepalive_interval_s",
                format!(
                    "must be 0 (off) or between {MIN_KEEPALIVE_S} and {MAX_KEEPALIVE_S} \
                     (got {keepalive})"
                ),
            ));
        }
        Ok(())
    }

    /// The REGISTER policy as the registrar takes it.
    pub fn policy(&self) -> RegistrarConfig {
        RegistrarConfig {
            min_expires: self.min_expires,
            max_expires: self.max_expires,
            default_expires: self.default_expires,
            max_contacts: self.max_contacts,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(f: impl FnOnce(&mut RegistrarSection)) -> InvalidValue {
        let mut c = RegistrarSection::default();
        f(&mut c);
        c.check().unwrap_err()
    }

    #[test]
    fn defaults_are_valid_and_the_registrars() {
        assert!(RegistrarSection::default().check().is_ok());
        assert_eq!(
            RegistrarSection::default().policy(),
            RegistrarConfig::default()
        );
    }

    #[test]
    fn intervals_are_ordered() {
        assert_eq!(bad(|c| c.min_expires = 0).key, "min_expires");
        assert_eq!(bad(|c| c.max_expires = 30).key, "max_expires");
        let e = bad(|c| c.default_expires = 10);
        assert_eq!(
            e.to_string(),
            "default_expires: must be at least 60 (got 10)"
        );
        assert_eq!(
            bad(|c| c.unknown_aor_status = 500).key,
            "unknown_aor_status"
        );
    }

    #[test]
    fn keepalive_interval_is_off_or_in_range() {
        for ok in [0, 5, 30, 3600] {
            let c = RegistrarSection {
                keepalive_interval_s: ok,
                ..RegistrarSection::default()
            };
            assert!(c.check().is_ok(), "{ok}");
        }
        for n in [1, 4, 3601] {
            assert_eq!(
                bad(|c| c.keepalive_interval_s = n).to_string(),
                format!("keepalive_interval_s: must be 0 (off) or between 5 and 3600 (got {n})")
            );
        }
    }
}
