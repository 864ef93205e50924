//! The script engine's figures: failed hook runs and the time hooks spend in Lua, by hook.
//! Counters are the engine's own ([`super::ScriptStats`]); [`super::ScriptEngine::register_metrics`]
//! puts the families on the telemetry handle.
//!
//! Metrics: `strowger_script_time_limits_total`, `strowger_script_vms_abandoned_total`,
//! `strowger_script_memory_bytes`,
//! `strowger_script_errors_total{hook}`,
//! `strowger_script_hook_duration_seconds{hook}`.

use super::{Hook, ScriptEngine, ScriptStats};
use crate::metrics::{self, load, Histograms, Telemetry};

// The hook table is the label set: one name per hook, nothing else.
crate::label!(
    Hook,
    "hook",
    Invite = "on_invite",
    Register = "on_register",
    CallEnd = "on_call_end",
    Message = "on_message",
    Subscribe = "on_subscribe",
    Refer = "on_refer",
);

/// `strowger_script_hook_duration_seconds{hook}`: time a hook run spent executing Lua
/// (waits on dials and lookups not included: those are the call's, not the script's).
pub struct HookDurations(Histograms<Hook>);

impl Default for HookDurations {
    fn default() -> HookDurations {
        HookDurations(Histograms::new(
            "strowger_script_hook_duration_seconds",
            "Time a hook run spent executing Lua (waits on dials excluded)",
            vec![
                0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001,
                0.002_5, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0,
            ],
        ))
    }
}

impl std::fmt::Debug for HookDurations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HookDurations")
    }
}

impl HookDurations {
    pub fn observe(&self, hook: Hook, secs: f64) {
        self.0.observe(hook, secs);
    }
}

impl ScriptEngine {
    /// Registers the engine's families on `telemetry`, filled from its counters at each
    /// scrape.
    pub fn register_metrics(&self, telemetry: &Telemetry) -> Result<(), metrics::Error> {
        let stats: &ScriptStats = self.stats();
        telemetry.register(stats.hook_duration.0.family())?;
        let errors = telemetry.counters::<Hook>(
            "strowger_script_errors_total",
            "Hook runs that failed (Lua error, instruction or time limit, memory, abandoned VM), by hook",
        )?;
        let time_limits = telemetry.counter(
            "strowger_script_time_limits_total",
            "Hook runs stopped by script.time_limit_ms (including runs on an abandoned VM)",
        )?;
        let abandoned = telemetry.counter(
            "strowger_script_vms_abandoned_total",
            "Lua VMs abandoned (stuck where no budget is checked) and replaced by fresh ones",
        )?;
        let memory = telemetry.gauge(
            "strowger_script_memory_bytes",
            "Bytes held by the Lua VMs of the running script (each VM bounded by script.memory_limit_kb)",
        )?;
        let engine = self.clone();
        telemetry.on_scrape(move || {
            memory.set(i64::try_from(engine.memory().bytes).unwrap_or(i64::MAX));
            let s = engine.stats();
            for h in Hook::ALL {
                errors.catch_up(h, load(&s.hook_errors[h.index()]));
            }
            metrics::catch_up(&time_limits, load(&s.time_limits));
            metrics::catch_up(&abandoned, load(&s.vms_abandoned));
        });
        Ok(())
    }
}
