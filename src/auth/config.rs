//! `[auth]`: digest authentication (RFC 3261 22, RFC 7616, RFC 8760): nonce lifetime, the
//! per-source failure throttle, and the algorithms offered.

use super::{Algorithm, DigestConfig};
use crate::config_section::{check_range, InvalidValue, MAX_TIMEOUT_S};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `[auth]`.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// How long a nonce is good for, seconds (then `stale=true`).
    pub nonce_ttl_s: u64,
    /// Failed attempts from one source address within `failure_window_s` before 403.
    pub max_failures: u32,
    pub failure_window_s: u64,
    /// Digest algorithms offered, in order of preference: "MD5", "SHA-256" (MD5 first: SIPp
    /// 3.6 and baresip answer only the first challenge).
    pub algorithms: Vec<String>,
    /// Nonces whose count is remembered (replay protection) at most; past it a right answer
    /// with a new nonce is challenged again. Only verified answers fill it.
    pub max_tracked_nonces: usize,
    /// Source addresses whose failures are counted at most; past it new sources go
    /// uncounted (the ones tracked stay: an attacker cannot flush a blocked address out).
    pub max_failure_sources: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            nonce_ttl_s: 300,
            max_failures: 5,
            failure_window_s: 60,
            algorithms: vec!["MD5".into(), "SHA-256".into()],
            max_tracked_nonces: 2_000_000,
            max_failure_sources: 262_144,
        }
    }
}

impl AuthConfig {
    pub fn check(&self) -> Result<(), InvalidValue> {
        check_range("nonce_ttl_s", self.nonce_ttl_s, 1, MAX_TIMEOUT_S)?;
        check_range("failure_window_s", self.failure_window_s, 1, MAX_TIMEOUT_S)?;
        check_range(
            "max_tracked_nonces",
            self.max_tracked_nonces as u64,
            1_000,
            100_000_000,
        )?;
        check_range(
            "max_failure_sources",
            self.max_failure_sources as u64,
            1_000,
            100_000_000,
        )?;
        if self.algorithms.is_empty() {
            return Err(InvalidValue::new(
                "algorithms",
                "at least one algorithm is required (\"MD5\", \"SHA-256\")",
            ));
        }
        let mut seen = Vec::new();
        for (i, name) in self.algorithms.iter().enumerate() {
            let Some(a) = Algorithm::parse(name) else {
                return Err(InvalidValue::entry(
                    "algorithms",
                    i,
                    format!("unknown algorithm {name:?} (expected \"MD5\" or \"SHA-256\")"),
                ));
            };
            if seen.contains(&a) {
                return Err(InvalidValue::entry(
                    "algorithms",
                    i,
                    format!("{name:?} is listed twice"),
                ));
            }
            seen.push(a);
        }
        Ok(())
    }

    /// The digest settings for `realm` (`sip.domain`). Values are as checked by
    /// [`AuthConfig::check`]; an algorithm name it would refuse is skipped.
    pub fn digest(&self, realm: impl Into<String>) -> DigestConfig {
        let mut cfg = DigestConfig::new(realm);
        cfg.nonce_ttl = Duration::from_secs(self.nonce_ttl_s);
        cfg.max_failures = self.max_failures;
        cfg.failure_window = Duration::from_secs(self.failure_window_s);
        cfg.max_tracked_nonces = self.max_tracked_nonces;
        cfg.throttle = super::Throttle::PerSource {
            max_sources: self.max_failure_sources,
        };
        cfg.algorithms = self
            .algorithms
            .iter()
            .filter_map(|a| Algorithm::parse(a))
            .collect();
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(f: impl FnOnce(&mut AuthConfig)) -> InvalidValue {
        let mut c = AuthConfig::default();
        f(&mut c);
        c.check().unwrap_err()
    }

    #[test]
    fn defaults_match_the_digest_layers() {
        // DigestConfig::new carries the same defaults for callers without a file (tests);
        // this keeps the two from drifting apart.
        assert!(AuthConfig::default().check().is_ok());
        let from_file = AuthConfig::default().digest("example.com");
        let own = DigestConfig::new("example.com");
        assert_eq!(from_file.nonce_ttl, own.nonce_ttl);
        assert_eq!(from_file.max_failures, own.max_failures);
        assert_eq!(from_file.failure_window, own.failure_window);
        assert_eq!(from_file.algorithms, own.algorithms);
    }

    #[test]
    fn bad_values_name_the_key() {
        assert_eq!(bad(|c| c.nonce_ttl_s = 0).key, "nonce_ttl_s");
        assert_eq!(bad(|c| c.failure_window_s = 86_401).key, "failure_window_s");
        assert_eq!(bad(|c| c.algorithms.clear()).key, "algorithms");
        let e = bad(|c| c.algorithms = vec!["MD5".into(), "SHA-512".into()]);
        assert_eq!((e.key.as_str(), e.index), ("algorithms", Some(1)));
        let e = bad(|c| c.algorithms = vec!["MD5".into(), "md5".into()]);
        assert_eq!(e.message, "\"md5\" is listed twice");
    }

    #[test]
    fn order_is_kept() {
        let c = AuthConfig {
            algorithms: vec!["SHA-256".into(), "MD5".into()],
            ..AuthConfig::default()
        };
        assert_eq!(
            c.digest("r").algorithms,
            vec![Algorithm::Sha256, Algorithm::Md5]
        );
        // The default puts MD5 first (interop: clients that answer only the first challenge).
        assert_eq!(
            AuthConfig::default().digest("r").algorithms,
            vec![Algorithm::Md5, Algorithm::Sha256]
        );
    }
}
