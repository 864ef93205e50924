//! `[http]`: where the admin API, health checks and `/metrics` listen, and the admin token.

use crate::config_section::InvalidValue;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// `[http]`: the admin / metrics endpoint.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `IP:PORT`.
    pub listen: String,
    /// Bearer token of the admin API (`/registrations`, `/reload`, `/drain`); empty = none:
    /// then only a loopback `listen` serves them, without a token.
    pub token: String,
    /// With `token` empty on a loopback `listen`: whether state-changing requests (POST)
    /// are served without a token. Off by default: any web page a browser on the host
    /// opens could otherwise POST to it (issue 15). GETs stay open either way.
    pub open_local_writes: bool,
    /// Admin connections open at once; more are closed at once (counted in
    /// `strowger_admin_connections_refused_total`).
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (slowloris), and that an idle
    /// connection stays open.
    pub read_timeout_s: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9090".into(),
            token: String::new(),
            open_local_writes: false,
            max_connections: 256,
            read_timeout_s: 10,
        }
    }
}

impl HttpConfig {
    pub fn check(&self) -> Result<(), InvalidValue> {
        if let Err(e) = self.listen.parse::<SocketAddr>() {
            return Err(InvalidValue::new(
                "listen",
                format!(
                    "{:?} is not IP:PORT ({e}; IPv6 goes in brackets: [::1]:9090)",
                    self.listen
                ),
            ));
        }
        if self.max_connections == 0 {
            return Err(InvalidValue::new("max_connections", "must be at least 1"));
        }
        if !(1..=3600).contains(&self.read_timeout_s) {
            return Err(InvalidValue::new(
                "read_timeout_s",
                "must be between 1 and 3600 seconds",
            ));
        }
        // The token travels in an Authorization header, where these cannot be written.
        if self
            .token
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(InvalidValue::new(
                "token",
                "must not contain spaces or control characters",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_bad_values() {
        assert!(HttpConfig::default().check().is_ok());
        let listen = HttpConfig {
            listen: "localhost:80".into(),
            ..HttpConfig::default()
        };
        assert_eq!(listen.check().unwrap_err().key, "listen");
        let token = HttpConfig {
            token: "two words".into(),
            ..HttpConfig::default()
        };
        assert_eq!(token.check().unwrap_err().key, "token");
        let conns = HttpConfig {
            max_connections: 0,
            ..HttpConfig::default()
        };
        assert_eq!(conns.check().unwrap_err().key, "max_connections");
        let timeout = HttpConfig {
            read_timeout_s: 0,
            ..HttpConfig::default()
        };
        assert_eq!(timeout.check().unwrap_err().key, "read_timeout_s");
    }
}
