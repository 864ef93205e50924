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
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9090".into(),
            token: String::new(),
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
    }
}
