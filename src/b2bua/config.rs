//! `[call]`: defaults of the call core that a script can override per dial, call records,
//! route names and call traces.

use crate::config_section::{check_range, InvalidValue, MAX_TIMEOUT_S};
use serde::{Deserialize, Serialize};

/// Most route names in `call.routes` (each is a metric label value).
pub const MAX_ROUTES: usize = 64;

/// `[call]`.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CallConfig {
    /// How long a dial rings when the script gives no `timeout`, seconds.
    pub ring_timeout_s: u64,
    /// File that gets one JSON line per ended call (created when missing, appended to);
    /// empty = no call-record file.
    pub records_file: String,
    /// Route names a script may tag calls with (`call:set_route`): metric labels, so a
    /// fixed set of at most [`MAX_ROUTES`] names of letters, digits, `-` and `_`.
    pub routes: Vec<String>,
    /// Keep each call's SIP messages for `GET /calls/{id}/trace`.
    pub trace: bool,
    /// Most messages kept per call (a long call with many re-INVITEs keeps its first ones).
    pub trace_max_messages: usize,
    /// Traces of this many ended calls stay readable (the most recent ones).
    pub trace_keep_ended: usize,
    /// Seconds between in-dialog OPTIONS to both parties of an answered call; a party
    /// that answers 408 or 481, or not at all, ends the call. 0 = off.
    pub keepalive_s: u64,
    /// Overload: the queue delay (ms) a new call may meet before a growing fraction of new
    /// calls is refused with 503 and Retry-After. 0 = never refuse.
    pub overload_delay_ms: u64,
    /// The Retry-After (seconds) of those 503s.
    pub overload_retry_after_s: u64,
    /// RFC 4028 session timers: the interval asked for on the legs we start and the most
    /// granted to a caller, seconds (0 = session timers off).
    pub session_expires_s: u32,
    /// The least interval accepted; a caller asking for less gets 422 with Min-SE.
    pub min_se_s: u32,
}

impl Default for CallConfig {
    fn default() -> Self {
        CallConfig {
            ring_timeout_s: 60,
            records_file: String::new(),
            routes: Vec::new(),
            trace: true,
            trace_max_messages: 100,
            trace_keep_ended: 100,
            keepalive_s: 0,
            overload_delay_ms: 10,
            overload_retry_after_s: 2,
            session_expires_s: 1800,
            min_se_s: 90,
        }
    }
}

impl CallConfig {
    pub fn check(&self) -> Result<(), InvalidValue> {
        check_range("ring_timeout_s", self.ring_timeout_s, 1, MAX_TIMEOUT_S)?;
        if self.overload_delay_ms != 0 {
            check_range("overload_delay_ms", self.overload_delay_ms, 5, 10_000)?;
        }
        check_range(
            "overload_retry_after_s",
            self.overload_retry_after_s,
            1,
            3600,
        )?;
        if self.session_expires_s != 0 {
            check_range("min_se_s", self.min_se_s, 90, 86_400)?;
            check_range(
                "session_expires_s",
                self.session_expires_s,
                self.min_se_s,
                86_400,
            )?;
        }
        if self.keepalive_s != 0 {
            check_range("keepalive_s", self.keepalive_s, 5, MAX_TIMEOUT_S)?;
        }
        if self.records_file.chars().any(char::is_control) {
            return Err(InvalidValue::new(
                "records_file",
                format!(
                    "must be a path without control characters (got {:?})",
                    self.records_file
                ),
            ));
        }
        if self.routes.len() > MAX_ROUTES {
            return Err(InvalidValue::new(
                "routes",
                format!("at most {MAX_ROUTES} routes (metric labels stay bounded)"),
            ));
        }
        for (i, r) in self.routes.iter().enumerate() {
            let ok = !r.is_empty()
                && r.len() <= 64
                && r.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !ok {
                return Err(InvalidValue::entry(
                    "routes",
                    i,
                    format!("{r:?}: a route name is 1-64 letters, digits, '-' or '_'"),
                ));
            }
            if self.routes[..i].contains(r) {
                return Err(InvalidValue::entry(
                    "routes",
                    i,
                    format!("{r:?} is listed twice"),
                ));
            }
        }
        check_range("trace_max_messages", self.trace_max_messages, 1, 10_000)?;
        check_range("trace_keep_ended", self.trace_keep_ended, 0, 100_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(f: impl FnOnce(&mut CallConfig)) -> InvalidValue {
        let mut c = CallConfig::default();
        f(&mut c);
        c.check().unwrap_err()
    }

    #[test]
    fn defaults_and_bad_values() {
        assert!(CallConfig::default().check().is_ok());
        assert_eq!(bad(|c| c.ring_timeout_s = 0).key, "ring_timeout_s");
        assert_eq!(
            bad(|c| c.records_file = "calls\n.jsonl".into()).key,
            "records_file"
        );
        assert_eq!(bad(|c| c.trace_max_messages = 0).key, "trace_max_messages");
        assert_eq!(
            bad(|c| c.trace_keep_ended = 100_001).key,
            "trace_keep_ended"
        );
    }

    #[test]
    fn routes_are_bounded_names_listed_once() {
        let e = bad(|c| c.routes = vec!["pstn".into(), "bad name".into()]);
        assert_eq!((e.key.as_str(), e.index), ("routes", Some(1)));
        let e = bad(|c| c.routes = vec!["pstn".into(), "sip".into(), "pstn".into()]);
        assert_eq!(
            (e.index, e.message.as_str()),
            (Some(2), "\"pstn\" is listed twice")
        );
        let e = bad(|c| c.routes = (0..=MAX_ROUTES).map(|i| format!("r{i}")).collect());
        assert_eq!((e.key.as_str(), e.index), ("routes", None));
    }
}
