//! The script engine's figures: failed hook runs and the time hooks spend in Lua, by hook.
//! Counters are the engine's own ([`super::ScriptStats`]); [`super::ScriptEngine::register_metrics`]
//! puts the families on the telemetry handle.
//!
//! Metrics: `strowger_script_errors_total{hook}`,
//! `strowger_script_hook_duration_seconds{hook}`.

use super::{ScriptEngine, ScriptStats};
use crate::metrics::{self, load, Histograms, Label, Telemetry};

/// A hook as a metric label (a fixed set, so labels stay bounded); anything else is
/// counted as `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    OnInvite,
    OnRegister,
    OnCallEnd,
    OnMessage,
    OnSubscribe,
    OnRefer,
    Other,
}
crate::label!(
    Hook,
    "hook",
    OnInvite = "on_invite",
    OnRegister = "on_register",
    OnCallEnd = "on_call_end",
    OnMessage = "on_message",
    OnSubscribe = "on_subscribe",
    OnRefer = "on_refer",
    Other = "other",
);

impl Hook {
    /// The hook of that Lua name (`Other` for any other).
    pub fn named(name: &str) -> Hook {
        Hook::ALL
            .iter()
            .copied()
            .find(|h| h.as_str() == name)
            .unwrap_or(Hook::Other)
    }
}

/// The index in [`ScriptStats::hook_errors`] of the hook named `hook`.
pub(crate) fn hook_index(hook: &str) -> usize {
    Hook::named(hook).index()
}

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
    pub fn observe(&self, hook: &str, secs: f64) {
        self.0.observe(Hook::named(hook), secs);
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
            "Hook runs that failed (Lua error, budget, memory), by hook",
        )?;
        let engine = self.clone();
        telemetry.on_scrape(move || {
            let s = engine.stats();
            for h in Hook::ALL {
                errors.catch_up(*h, load(&s.hook_errors[h.index()]));
            }
        });
        Ok(())
    }
}
