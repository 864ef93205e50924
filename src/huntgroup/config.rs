//! `[huntgroups.<name>]`: the configured hunt groups. Not settable from the environment (a
//! group is a table of its own).

use super::Strategy;
use crate::config_section::{InvalidValue, MAX_TIMEOUT_S};
use crate::sip::Uri;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// `[huntgroups.<name>]`: one hunt group. Durations in seconds.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HuntGroupConfig {
    /// `ring-all`, `linear`, `round-robin`, `least-recent`, `fewest-calls`, `random`,
    /// `weighted`.
    pub strategy: String,
    /// Extensions (`"1001"`: rung at their registered contacts) or SIP URIs.
    pub members: Vec<String>,
    /// How long one agent (or, for ring-all, everyone) rings before the next try.
    pub ring_timeout: u64,
    /// How long a caller may wait in all before the outcome goes back to the script.
    pub max_wait: u64,
    /// Seconds after a call before the agent is rung again.
    pub wrap_up: u64,
    /// One weight per member, for `weighted` (empty = all 1).
    pub weights: Vec<u32>,
    /// Unanswered rings in a row after which the agent is paused (0 = never).
    pub max_missed: u32,
    /// Seconds between the 182 Queued repeats to a waiting caller.
    pub queue_announce: u64,
    /// `fewest-calls` counts answered calls since the last multiple of this many seconds
    /// since the Unix epoch (86400 = since midnight UTC).
    pub calls_reset_s: u64,
}

impl Default for HuntGroupConfig {
    fn default() -> Self {
        HuntGroupConfig {
            strategy: "ring-all".into(),
            members: Vec::new(),
            ring_timeout: 15,
            max_wait: 120,
            wrap_up: 10,
            weights: Vec::new(),
            max_missed: 3,
            queue_announce: 20,
            calls_reset_s: 86400,
        }
    }
}

/// Checks every group; keys are relative to `[huntgroups]` (`support.members`).
pub fn check_huntgroups(groups: &BTreeMap<String, HuntGroupConfig>) -> Result<(), InvalidValue> {
    for (name, g) in groups {
        // Group names are metric labels and Lua arguments: keep them plain.
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        {
            return Err(InvalidValue::new(
                name.as_str(),
                "a group name is lower-case letters, digits, - and _",
            ));
        }
        g.check().map_err(|e| e.within(name))?;
    }
    Ok(())
}

impl HuntGroupConfig {
    /// Checks one group; keys are relative to the group (`members`).
    pub fn check(&self) -> Result<(), InvalidValue> {
        if Strategy::parse(&self.strategy).is_none() {
            return Err(InvalidValue::new(
                "strategy",
                format!(
                    "unknown strategy {:?}, expected one of {}",
                    self.strategy,
                    Strategy::NAMES.join(", ")
                ),
            ));
        }
        if self.members.is_empty() {
            return Err(InvalidValue::new(
                "members",
                "at least one member is required",
            ));
        }
        let mut seen = HashSet::new();
        for (i, m) in self.members.iter().enumerate() {
            let ok = !m.is_empty()
                && !m
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || "<>\"".contains(c))
                && (!m.contains(':') || Uri::parse(m).is_ok());
            if !ok {
                return Err(InvalidValue::entry(
                    "members",
                    i,
                    format!("bad member {m:?}: an extension (\"1001\") or a SIP URI"),
                ));
            }
            if !seen.insert(m) {
                return Err(InvalidValue::entry(
                    "members",
                    i,
                    format!("member {m:?} is listed twice"),
                ));
            }
        }
        if !self.weights.is_empty() && self.weights.len() != self.members.len() {
            return Err(InvalidValue::new(
                "weights",
                format!(
                    "one weight per member: {} members, {} weights",
                    self.members.len(),
                    self.weights.len()
                ),
            ));
        }
        if self.strategy == Strategy::Weighted.name()
            && !self.weights.is_empty()
            && self.weights.iter().all(|w| *w == 0)
        {
            return Err(InvalidValue::new(
                "weights",
                "at least one weight must be above 0",
            ));
        }
        for (k, v, min, max) in [
            ("ring_timeout", self.ring_timeout, 1, MAX_TIMEOUT_S),
            ("max_wait", self.max_wait, 1, MAX_TIMEOUT_S),
            ("wrap_up", self.wrap_up, 0, MAX_TIMEOUT_S),
            ("queue_announce", self.queue_announce, 1, MAX_TIMEOUT_S),
            ("calls_reset_s", self.calls_reset_s, 60, 366 * 86400),
        ] {
            if v < min || v > max {
                return Err(InvalidValue::new(
                    k,
                    format!("must be between {min} and {max} (got {v})"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(members: &[&str]) -> HuntGroupConfig {
        HuntGroupConfig {
            members: members.iter().map(|m| m.to_string()).collect(),
            ..HuntGroupConfig::default()
        }
    }

    fn err(f: impl FnOnce(&mut HuntGroupConfig)) -> InvalidValue {
        let mut g = group(&["1001", "sip:b@example.com"]);
        f(&mut g);
        g.check().unwrap_err()
    }

    #[test]
    fn a_group_with_members_is_valid() {
        assert!(group(&["1001"]).check().is_ok());
        let weighted = HuntGroupConfig {
            strategy: "weighted".into(),
            weights: vec![3, 1],
            ..group(&["1001", "sip:b@example.com"])
        };
        assert!(weighted.check().is_ok());
    }

    #[test]
    fn bad_values_name_the_key() {
        let e = err(|g| g.strategy = "ring-some".into());
        assert_eq!(e.key, "strategy");
        assert!(e.message.starts_with("unknown strategy"), "{e}");
        assert_eq!(err(|g| g.members.clear()).key, "members");
        let e = err(|g| g.members[1] = "sip:bad uri".into());
        assert_eq!((e.key.as_str(), e.index), ("members", Some(1)));
        let e = err(|g| g.members[1] = "1001".into());
        assert_eq!(e.message, "member \"1001\" is listed twice");
        assert_eq!(err(|g| g.weights = vec![1]).key, "weights");
        let e = err(|g| {
            g.strategy = "weighted".into();
            g.weights = vec![0, 0];
        });
        assert_eq!(e.key, "weights");
        let e = err(|g| g.ring_timeout = 0);
        assert_eq!(
            e.to_string(),
            "ring_timeout: must be between 1 and 86400 (got 0)"
        );
        assert_eq!(err(|g| g.calls_reset_s = 59).key, "calls_reset_s");
    }

    #[test]
    fn keys_are_relative_to_huntgroups() {
        let mut groups = BTreeMap::new();
        groups.insert("support".to_string(), group(&[]));
        assert_eq!(
            check_huntgroups(&groups).unwrap_err().key,
            "support.members"
        );
        groups.clear();
        groups.insert("Support".to_string(), group(&["1001"]));
        let e = check_huntgroups(&groups).unwrap_err();
        assert_eq!(e.key, "Support");
        assert!(e.message.contains("lower-case"), "{e}");
    }
}
