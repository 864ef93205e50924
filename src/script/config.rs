//! `[script]`: which dial plan runs, and the limits every hook run is held to.

use crate::config_section::{check_range, InvalidValue};
use serde::{Deserialize, Serialize};

/// Upper bound of `memory_limit_kb` (4 GiB), so KiB→bytes cannot overflow.
const MAX_MEMORY_KB: usize = 4 * 1024 * 1024;
/// Upper bound of `time_limit_ms` (one hour): a hook run is not meant to compute for
/// longer, and the watchdog's arithmetic stays far from overflow.
const MAX_TIME_LIMIT_MS: u64 = 3_600_000;
/// Upper bound of `vm_pool_size`: each VM costs memory; more than this is a typo.
const MAX_VM_POOL: usize = 1024;

/// `[script]`: the Lua dial plan.
#[derive(Deserialize, Serialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ScriptConfig {
    pub path: String,
    /// Per-VM memory limit in KiB; 0 = no limit.
    pub memory_limit_kb: usize,
    /// VM instructions one hook run may execute.
    pub instruction_limit: u64,
    /// Lua execution time one hook run (or the script's top-level code) may use, ms;
    /// 0 = no limit. Waiting in `call:dial` does not count.
    pub time_limit_ms: u64,
    /// Number of Lua VMs; 0 = one per CPU core.
    pub vm_pool_size: usize,
    /// Each VM on a thread of its own (true), or every VM on the one SIP thread (false,
    /// with `sip.workers = 1`): no thread hand-off per hook, and a hook run may execute Lua
    /// for 50 ms at one go (see `pool.rs`). Unset: false with one SIP worker, true with more
    /// ([`ScriptConfig::vm_threads`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vm_threads: Option<bool>,
}

impl Default for ScriptConfig {
    fn default() -> Self {
        ScriptConfig {
            path: "scripts/default.lua".into(),
            // One set of defaults: the engine's own (`EngineOptions::new`).
            memory_limit_kb: super::DEFAULT_MEMORY_LIMIT_KB,
            instruction_limit: super::DEFAULT_INSTRUCTION_LIMIT,
            time_limit_ms: super::DEFAULT_TIME_LIMIT_MS,
            vm_pool_size: 0,
            vm_threads: None,
        }
    }
}

impl ScriptConfig {
    pub fn check(&self) -> Result<(), InvalidValue> {
        if self.path.is_empty() {
            return Err(InvalidValue::new("path", "must not be empty"));
        }
        check_range("memory_limit_kb", self.memory_limit_kb, 0, MAX_MEMORY_KB)?;
        check_range("instruction_limit", self.instruction_limit, 1, u64::MAX)?;
        check_range("time_limit_ms", self.time_limit_ms, 0, MAX_TIME_LIMIT_MS)?;
        check_range("vm_pool_size", self.vm_pool_size, 0, MAX_VM_POOL)
    }

    /// Whether the VMs run on threads of their own with `sip_workers` SIP threads: as
    /// configured, else only when there is more than one SIP thread to put them on.
    pub fn vm_threads(&self, sip_workers: usize) -> bool {
        self.vm_threads.unwrap_or(sip_workers != 1)
    }

    /// `vm_threads = false` puts the VMs on the SIP thread, so there must be exactly one.
    pub fn check_with_workers(&self, sip_workers: usize) -> Result<(), InvalidValue> {
        if self.vm_threads == Some(false) && sip_workers != 1 {
            return Err(InvalidValue::new(
                "vm_threads",
                "false needs sip.workers = 1 (the Lua VMs then run on the one SIP thread)",
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
        let c = ScriptConfig::default();
        assert!(c.check().is_ok());
        assert_eq!(c.path, "scripts/default.lua");
        let bad = |f: fn(&mut ScriptConfig)| {
            let mut c = ScriptConfig::default();
            f(&mut c);
            c.check().unwrap_err().key
        };
        assert_eq!(bad(|c| c.path.clear()), "path");
        assert_eq!(
            bad(|c| c.memory_limit_kb = MAX_MEMORY_KB + 1),
            "memory_limit_kb"
        );
        assert_eq!(bad(|c| c.instruction_limit = 0), "instruction_limit");
        assert_eq!(bad(|c| c.vm_pool_size = 1025), "vm_pool_size");
        assert_eq!(bad(|c| c.time_limit_ms = 3_600_001), "time_limit_ms");
        // Unset: on the SIP thread when there is one, on threads of their own otherwise.
        assert!(!c.vm_threads(1));
        assert!(c.vm_threads(2) && c.vm_threads(0));
        assert!(c.check_with_workers(2).is_ok());
        let inline = ScriptConfig {
            vm_threads: Some(false),
            ..ScriptConfig::default()
        };
        assert!(inline.check_with_workers(1).is_ok());
        assert_eq!(inline.check_with_workers(2).unwrap_err().key, "vm_threads");
        assert_eq!(inline.check_with_workers(0).unwrap_err().key, "vm_threads");
        assert!(c.check_with_workers(4).is_ok());
        // One set of defaults: the configuration's are the engine's.
        let engine = super::super::EngineOptions::new(&c.path);
        assert_eq!(c.memory_limit_kb * 1024, engine.memory_limit);
        assert_eq!(c.instruction_limit, engine.instruction_limit);
        assert_eq!(c.time_limit_ms as u128, engine.time_limit.as_millis());
    }
}
