//! SIP digest authentication (RFC 3261 section 22, RFC 7616 qop=auth, RFC 8760 SHA-256).
//!
//! Owns: challenges (401/407 with SHA-256 and MD5 offers), the client side that answers a
//! trunk's challenges (`DigestClient`), verification of Authorization
//! and Proxy-Authorization, self-validating nonces with expiry (stale=true) and nonce-count
//! replay protection, the per-source brute-force throttle, and the users file.
//! Must not touch: sockets, transactions, the registrar's bindings. Callers decide which
//! requests need credentials and send the response `DigestAuth::respond` builds.
//!
//! ## Config keys (`[auth]`: [`AuthConfig`] in `config.rs`; wired by the server)
//! - `registrar.users_file`: path of the users file (`Users::load`), realm = `sip.domain`.
//! - `auth.nonce_ttl_s` (300): how long a nonce is accepted (`DigestConfig::nonce_ttl`).
//! - `auth.max_failures` (5): wrong answers from one source IP within the window after
//!   which it gets 403 (`DigestConfig::max_failures`; 0 turns the throttle off).
//! - `auth.failure_window_s` (60): that window, and how long the 403s last.
//!
//! ## The users file
//! ```toml
//! [users.alice]
//! ha1_sha256 = "..."   # printf '%s' 'alice:example.com:secret' | sha256sum
//! ha1_md5 = "..."      # printf '%s' 'alice:example.com:secret' | md5sum
//! [users.dev]
//! password = "secret"  # development: HA1s computed at load
//! ```
//! HA1 = H(user ":" realm ":" password) (RFC 7616 3.4.2), so no password need be stored.
//! Give both HA1s: a phone that speaks SHA-256 answers the SHA-256 challenge (it comes
//! first), and a user with only an MD5 HA1 cannot answer it.
//!
//! ## Decisions
//! - A replayed nonce count (not above the last accepted one for that nonce) gets a fresh
//!   challenge with stale=false rather than 403: UDP retransmissions are absorbed by the
//!   transaction layer, so a repeat is either an attacker (who learns nothing and cannot
//!   answer the new nonce) or a client that wrongly reuses counts, which recovers by
//!   starting the new nonce at 1. Counted in `DigestStats::replays`, not as a failure.
//! - Credentials for our realm that cannot be read, or whose `uri` is not the
//!   Request-URI, get 400 (RFC 7616 3.4.6), hence `AuthOutcome::BadRequest`.
//! - A failure from a source counts towards its throttle; a success does not reset it
//!   (else one valid account would let an attacker reset the count between guesses).
//! - A nonce we did not issue, or an opaque that is not ours, is challenged without
//!   checking the answer, and is not counted as a failure: after a restart every phone
//!   presents one once.
//! - Hash comparison is constant-time (`subtle`): a hand-written loop can be turned into
//!   an early exit by the optimizer; `subtle` is written to prevent that.

mod client;
mod config;
mod digest;
mod hash;
mod metrics;
mod params;
mod state;
mod users;

pub use client::{Answer, ClientAuthError, ClientCredentials, ClientSecret, DigestClient};
pub use config::AuthConfig;
pub use digest::{AuthOutcome, ChallengeKind, DigestAuth, DigestConfig, DigestStats, Throttle};
pub use hash::{ha1, Algorithm};
pub use params::{answer_challenge, Challenge};
pub use state::{Clock, ManualClock, SystemClock};
pub use users::{UserSecrets, Users};

use std::path::PathBuf;

/// Errors loading the users file; each names the file, and where it applies the user and
/// the key.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{}: cannot read users file: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not valid TOML: {detail}", path.display())]
    Toml { path: PathBuf, detail: String },
    #[error("{}: {detail}", path.display())]
    File { path: PathBuf, detail: String },
    #[error("{}: user `{user}`{}: {detail}", path.display(), if key.is_empty() { String::new() } else { format!(", key `{key}`") })]
    User {
        path: PathBuf,
        user: String,
        key: String,
        detail: String,
    },
}

#[cfg(test)]
mod tests;
