//! The Lua face of hunt groups: `call:hunt(name, opts)` and the `huntgroup` namespace
//! (`huntgroup.agents(name)`, `huntgroup.set_state(agent, state)`). The hunting itself is
//! `crate::huntgroup`; this file only turns Lua values into its types and back, and adapts
//! the call's [`CallControl`] to its [`HuntLeg`].

use std::sync::Arc;
use std::time::Duration;

use mlua::{Lua, Table, Thread, Value};

use super::call::{CallHandle, CallSlots, DialInProgress};
use super::record::{record, Field};
use super::wait::{wait_marker, Waits};
use super::{CallControl, DialOptions, DialOutcome, DialSource, DialTarget, Services};
use crate::huntgroup::{BoxFuture, HuntLeg, HuntOptions, Rung, Strategy};

/// The call, as a hunt sees it.
struct Leg(Arc<dyn CallControl>);

impl HuntLeg for Leg {
    fn ring(&self, targets: Vec<String>, timeout: Duration) -> BoxFuture<'static, Rung> {
        let dial = self.0.dial_indexed(
            targets.into_iter().map(DialTarget::Uri).collect(),
            DialOptions {
                timeout: Some(timeout),
                ..DialOptions::default()
            },
        );
        Box::pin(async move {
            let (o, winner) = dial.await;
            Rung {
                answered: o.answered,
                status: o.status,
                reason: o.reason,
                winner,
            }
        })
    }

    fn queued(&self, position: usize) {
        // RFC 3261 21.1.3 (182 Queued); the position in a Warning (20.43, code 399:
        // miscellaneous) that any phone can show, and in a header of our own.
        self.0.provisional(
            182,
            "Queued",
            vec![
                (
                    "Warning".into(),
                    format!("399 strowger \"queue position {position}\""),
                ),
                ("X-Queue-Position".into(), position.to_string()),
            ],
        );
    }

    fn is_gone(&self) -> bool {
        self.0.is_ended()
    }

    fn ended(&self) -> BoxFuture<'static, ()> {
        self.0.ended()
    }
}

fn secs(v: &Value, name: &str) -> Result<Duration, String> {
    let n = match v {
        Value::Integer(i) => *i as f64,
        Value::Number(n) => *n,
        other => {
            return Err(format!(
                "call:hunt: option {name}: expected seconds (a number), got a {}",
                other.type_name()
            ))
        }
    };
    if !(n > 0.0 && n <= 86_400.0) {
        return Err(format!(
            "call:hunt: option {name} must be between 0 and 86400 seconds, got {n}"
        ));
    }
    Ok(Duration::from_secs_f64(n))
}

fn parse_options(v: &Value) -> Result<HuntOptions, String> {
    let mut opts = HuntOptions::default();
    let t = match v {
        Value::Nil => return Ok(opts),
        Value::Table(t) => t,
        other => {
            return Err(format!(
                "call:hunt: expected an options table as second argument, got a {}",
                other.type_name()
            ))
        }
    };
    for pair in t.clone().pairs::<Value, Value>() {
        let (k, v) = pair.map_err(|e| format!("call:hunt: options: {e}"))?;
        let Value::String(k) = k else {
            return Err("call:hunt: options: option names must be strings".into());
        };
        match &*k.to_string_lossy() {
            "strategy" => {
                let name = match &v {
                    Value::String(s) => s.to_string_lossy(),
                    _ => String::new(),
                };
                opts.strategy = Some(Strategy::parse(&name).ok_or_else(|| {
                    format!(
                        "call:hunt: unknown strategy {name:?} (known: {})",
                        Strategy::NAMES.join(", ")
                    )
                })?);
            }
            "ring_timeout" => opts.ring_timeout = Some(secs(&v, "ring_timeout")?),
            "max_wait" => opts.max_wait = Some(secs(&v, "max_wait")?),
            "priority" => {
                opts.priority = match v {
                    Value::Integer(i) => i,
                    Value::Number(n) if n.fract() == 0.0 && n.abs() < 1e9 => n as i64,
                    _ => return Err("call:hunt: option priority must be an integer".into()),
                }
            }
            other => {
                return Err(format!(
                    "call:hunt: unknown option '{other}' (known: strategy, ring_timeout, max_wait, priority)"
                ))
            }
        }
    }
    Ok(opts)
}

/// Adds the raw functions the sandbox prelude wraps: `call_hunt(ud, name, opts)` →
/// `(error)`, or the wait marker, on which the sandbox yields for `(error)` or
/// `(nil, outcome)`; `huntgroup_agents(name)` → `(error)` or `(nil, list)`;
/// `huntgroup_set_state(agent, state, running coroutine)` → `(error)`, or the wait marker,
/// on which the sandbox yields for `(error)` or `(nil)`.
pub(crate) fn register(
    lua: &Lua,
    helpers: &Table,
    services: &Services,
    waits: &Waits,
    calls: &Arc<CallSlots>,
) -> mlua::Result<()> {
    let svc = services.clone();
    let slots = calls.clone();
    let w = waits.clone();
    helpers.raw_set(
        "call_hunt",
        lua.create_function(move |lua, (ud, name, opts): (CallHandle, Value, Value)| {
            let groups = svc.hunt.read().clone();
            let main = svc.clone();
            let state = slots.get(ud)?;
            let prepared = (|| -> Result<_, String> {
                let name = match &name {
                    Value::String(s) => s.to_string_lossy(),
                    other => {
                        return Err(format!(
                            "call:hunt: expected a hunt group name, got a {}",
                            other.type_name()
                        ))
                    }
                };
                let opts = parse_options(&opts)?;
                let groups =
                    groups.ok_or_else(|| "call:hunt: no hunt groups are configured".to_owned())?;
                if !groups.names().contains(&name) {
                    return Err(format!("call:hunt: no hunt group named {name:?}"));
                }
                let control = state.start_dial().map_err(|e| e.replace("dial", "hunt"))?;
                Ok((DialInProgress(state), name, opts, groups, control))
            })();
            let (in_progress, name, opts, groups, control) = match prepared {
                Ok(p) => p,
                Err(msg) => return Ok((Value::String(lua.create_string(msg)?), Value::Nil)),
            };
            let lua = lua.clone();
            let hunted = async move {
                // Hunting spawns the group's own tasks: on the server's runtime, not on
                // this VM's thread.
                let leg = Arc::new(Leg(control));
                let result = main
                    .on_main(async move { groups.hunt(&name, opts, leg).await })
                    .await
                    .map_or_else(
                        || Err("the hunt stopped".to_owned()),
                        |r| r.map_err(|e| e.to_string()),
                    );
                let out = match result {
                    Ok(o) => o,
                    Err(e) => {
                        drop(in_progress);
                        let msg = lua.create_string(format!("call:hunt: {e}"))?;
                        return Ok((Value::String(msg), Value::Nil));
                    }
                };
                in_progress.0.finish_dial(&DialOutcome {
                    answered: out.answered,
                    ..DialOutcome::failed(out.status, out.reason.clone(), DialSource::Callee)
                });
                drop(in_progress);
                // One protected call for the table (`record`), not ~20.
                let t = record(
                    &lua,
                    &[
                        (c"answered", Some(Field::Bool(out.answered))),
                        (c"status", Some(Field::Int(i64::from(out.status)))),
                        (c"reason", Some(Field::Str(&out.reason))),
                        (c"agent", out.agent.as_deref().map(Field::Str)),
                        (c"queued", Some(Field::Bool(out.queued))),
                        (c"waited", Some(Field::Num(out.waited))),
                        (c"overflow", Some(Field::Bool(out.overflow))),
                        (c"abandoned", Some(Field::Bool(out.abandoned))),
                    ],
                )?;
                Ok((Value::Nil, Value::Table(t)))
            };
            w.start(None, Box::pin(hunted)).map_err(|()| {
                mlua::Error::runtime("call:hunt: cannot wait here (only in the call's own hook)")
            })?;
            Ok((wait_marker(), Value::Nil))
        })?,
    )?;

    let svc = services.clone();
    helpers.raw_set(
        "huntgroup_agents",
        lua.create_function(move |lua, name: Value| {
            let Value::String(name) = name else {
                return Ok((
                    Some("huntgroup.agents: expected a hunt group name".to_owned()),
                    None,
                ));
            };
            let Some(groups) = svc.hunt.read().clone() else {
                return Ok((
                    Some("huntgroup.agents: no hunt groups are configured".to_owned()),
                    None,
                ));
            };
            let agents = match groups.agents(&name.to_string_lossy()) {
                Ok(a) => a,
                Err(e) => return Ok((Some(format!("huntgroup.agents: {e}")), None)),
            };
            let list = lua.create_table()?;
            for (i, a) in agents.into_iter().enumerate() {
                let t = record(
                    lua,
                    &[
                        (c"agent", Some(Field::Str(&a.agent))),
                        (c"state", Some(Field::Str(a.state))),
                        (c"presence", Some(Field::Str(a.presence))),
                        (c"missed", Some(Field::Int(i64::from(a.missed)))),
                        (
                            c"answered",
                            Some(Field::Int(i64::try_from(a.answered).unwrap_or(i64::MAX))),
                        ),
                        (c"last_end", Some(Field::Num(a.last_end))),
                    ],
                )?;
                list.raw_set(i + 1, t)?;
            }
            Ok((None, Some(list)))
        })?,
    )?;

    let svc = services.clone();
    let w = waits.clone();
    helpers.raw_set(
        "huntgroup_set_state",
        lua.create_function(move |lua, (agent, state, running): (Value, Value, Thread)| {
            let fail = |msg: &str| -> mlua::Result<Value> { Ok(Value::String(lua.create_string(msg)?)) };
            let (Value::String(agent), Value::String(state)) = (agent, state) else {
                return fail("huntgroup.set_state: expected an agent and a state (strings)");
            };
            let Some(groups) = svc.hunt.read().clone() else {
                return fail("huntgroup.set_state: no hunt groups are configured");
            };
            let (agent, state) = (agent.to_string_lossy(), state.to_string_lossy());
            let main = svc.clone();
            let lua = lua.clone();
            let stored = async move {
                // The agent store's I/O runs on the server's runtime, not this VM's thread.
                let stored = main
                    .on_main(async move { groups.set_state(&agent, &state).await })
                    .await;
                let err = match stored {
                    Some(Ok(())) => return Ok((Value::Nil, Value::Nil)),
                    Some(Err(e)) => format!("huntgroup.set_state: {e}"),
                    None => "huntgroup.set_state: the store did not answer".to_owned(),
                };
                Ok((Value::String(lua.create_string(err)?), Value::Nil))
            };
            // Any hook may set an agent's state, but only a hook coroutine can wait.
            match w.start(Some(running.state()), Box::pin(stored)) {
                Ok(()) => Ok(wait_marker()),
                Err(()) => fail(
                    "huntgroup.set_state: cannot wait here (on_register, on_message, on_subscribe and coroutines the script made cannot)",
                ),
            }
        })?,
    )?;
    Ok(())
}
