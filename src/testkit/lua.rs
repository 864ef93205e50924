//! The test files' Lua API: `test`, `phone`, `trunk`, `call`, `record`, `metric`,
//! `sleep`, `expect`, `expect_eq`. Each test runs in a fresh world ([`super::world`]);
//! the API's functions send commands to it and wait for its answers (plain data), so the
//! Lua side holds nothing of the engine.

use super::world::{Command, World};
use super::{report_line, TestError, TestResult};
use crate::config::Config;
use mlua::{Function, Lua, LuaSerdeExt, Table, Value};
use parking_lot::Mutex;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// What the API functions reach: the world of the test running now.
type Current = Arc<Mutex<Option<mpsc::UnboundedSender<Command>>>>;

/// Assertions, in Lua so that `error(..., 2)` names the test file's line.
const PRELUDE: &str = r#"
local function show(v)
  if type(v) == "string" then return string.format("%q", v) end
  if type(v) == "table" then
    local parts = {}
    for i, x in ipairs(v) do parts[i] = show(x) end
    return "{" .. table.concat(parts, ", ") .. "}"
  end
  return tostring(v)
end
local function same(a, b)
  if type(a) ~= "table" or type(b) ~= "table" then return a == b end
  if #a ~= #b then return false end
  for i = 1, #a do if not same(a[i], b[i]) then return false end end
  return true
end
-- The API's errors (an unknown phone, a bad option) name the test file's line too.
for _, name in ipairs({ "phone", "trunk", "call", "record", "metric" }) do
  local raw = _G[name]
  _G[name] = function(...)
    local ok, r = pcall(raw, ...)
    if not ok then error((tostring(r):match("^[^\n]*"):gsub("^runtime error: ", "")), 2) end
    return r
  end
end
function expect(cond, message)
  if not cond then error(message or "expectation failed", 2) end
  return cond
end
function expect_eq(actual, expected, what)
  if not same(actual, expected) then
    local prefix = what and (what .. ": ") or ""
    error(string.format("%sexpected %s, got %s", prefix, show(expected), show(actual)), 2)
  end
end
"#;

/// Loads `file`, then runs each `test(...)` it declared in a fresh world, writing a line per
/// test to `out`.
pub(super) async fn run_file(
    file: &Path,
    config: &Config,
    out: &mut dyn Write,
) -> Result<Vec<TestResult>, TestError> {
    let display = file.display().to_string();
    let load_error = |e: &dyn std::fmt::Display| TestError::Load {
        path: display.clone(),
        message: e.to_string(),
    };
    let source = std::fs::read_to_string(file).map_err(|e| load_error(&e))?;
    let lua = Lua::new();
    let declared: Arc<Mutex<Vec<(String, Function)>>> = Arc::default();
    let current: Current = Arc::default();
    install(&lua, &declared, &current).map_err(|e| load_error(&e))?;
    lua.load(&source)
        .set_name(format!("@{display}"))
        .exec()
        .map_err(|e| load_error(&first_line(&e)))?;
    let tests = std::mem::take(&mut *declared.lock());
    let mut results = Vec::with_capacity(tests.len());
    for (name, f) in tests {
        let wall = Instant::now();
        let started = tokio::time::Instant::now();
        let world = World::start(config).await;
        let (failure, ladder) = match world {
            Err(e) => (
                Some(format!("{display}: the server did not start: {e}")),
                String::new(),
            ),
            Ok(world) => {
                *current.lock() = Some(world.commands());
                let r = f.call_async::<()>(()).await;
                *current.lock() = None;
                let ladder = world.ladder();
                world.stop().await;
                (r.err().map(|e| first_line(&e)), ladder)
            }
        };
        let r = TestResult {
            file: display.clone(),
            name,
            ladder: if failure.is_some() {
                ladder
            } else {
                String::new()
            },
            failure,
            wall: wall.elapsed(),
            virtual_time: started.elapsed(),
        };
        let _ = writeln!(out, "{}", report_line(&r));
        results.push(r);
    }
    Ok(results)
}

/// The message of a Lua error without its traceback (it starts with `file:line:`).
fn first_line(e: &mlua::Error) -> String {
    let text = match e {
        mlua::Error::CallbackError { cause, .. } => return first_line(cause),
        mlua::Error::RuntimeError(m) | mlua::Error::SyntaxError { message: m, .. } => m.clone(),
        mlua::Error::WithContext { cause, .. } => return first_line(cause),
        other => other.to_string(),
    };
    text.lines()
        .take_while(|l| !l.starts_with("stack traceback"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn install(
    lua: &Lua,
    declared: &Arc<Mutex<Vec<(String, Function)>>>,
    current: &Current,
) -> mlua::Result<()> {
    let g = lua.globals();
    let d = declared.clone();
    g.set(
        "test",
        lua.create_function(move |_, (name, f): (String, Function)| {
            d.lock().push((name, f));
            Ok(())
        })?,
    )?;
    // phone(user, opts) / trunk(name, opts): a simulated device; returns its name.
    for kind in ["phone", "trunk"] {
        let current = current.clone();
        g.set(
            kind,
            lua.create_async_function(move |lua, (name, opts): (String, Option<Table>)| {
                let spec = opts.map(|t| lua.from_value::<serde_json::Value>(Value::Table(t)));
                let current = current.clone();
                async move {
                    let spec = spec.transpose()?.unwrap_or(serde_json::Value::Null);
                    let cmd = |reply| match kind {
                        "phone" => Command::Phone { name, spec, reply },
                        _ => Command::Trunk { name, spec, reply },
                    };
                    let v = ask(&current, cmd).await?;
                    to_lua(&lua, &v)
                }
            })?,
        )?;
    }
    {
        let current = current.clone();
        g.set(
            "call",
            lua.create_async_function(move |lua, opts: Table| {
                let spec = lua.from_value::<serde_json::Value>(Value::Table(opts));
                let current = current.clone();
                async move {
                    let spec = spec?;
                    let v = ask(&current, |reply| Command::Call { spec, reply }).await?;
                    to_lua(&lua, &v)
                }
            })?,
        )?;
    }
    {
        let current = current.clone();
        g.set(
            "record",
            lua.create_async_function(move |lua, ()| {
                let current = current.clone();
                async move {
                    let v = ask(&current, |reply| Command::Record { reply }).await?;
                    to_lua(&lua, &v)
                }
            })?,
        )?;
    }
    {
        let current = current.clone();
        g.set(
            "metric",
            lua.create_async_function(move |lua, name: String| {
                let current = current.clone();
                async move {
                    let v = ask(&current, |reply| Command::Metric { name, reply }).await?;
                    to_lua(&lua, &v)
                }
            })?,
        )?;
    }
    g.set(
        "sleep",
        lua.create_async_function(|_, seconds: f64| async move {
            tokio::time::sleep(std::time::Duration::from_secs_f64(seconds.max(0.0))).await;
            Ok(())
        })?,
    )?;
    lua.load(PRELUDE).set_name("=strowger").exec()?;
    Ok(())
}

/// Sends a command to the current world and waits for its answer; an error answer is a
/// Lua error at the caller's line.
async fn ask(
    current: &Current,
    cmd: impl FnOnce(oneshot::Sender<Result<serde_json::Value, String>>) -> Command,
) -> mlua::Result<serde_json::Value> {
    let Some(tx) = current.lock().clone() else {
        return Err(mlua::Error::runtime(
            "only inside a test(...) function: the world exists while a test runs",
        ));
    };
    let (reply, rx) = oneshot::channel();
    tx.send(cmd(reply))
        .map_err(|_| mlua::Error::runtime("the test's world has stopped"))?;
    match rx.await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(mlua::Error::runtime(e)),
        Err(_) => Err(mlua::Error::runtime("the test's world has stopped")),
    }
}

/// Plain data to Lua, JSON null as nil (so `r.answered_by == nil` reads naturally).
fn to_lua(lua: &Lua, v: &serde_json::Value) -> mlua::Result<Value> {
    let opts = mlua::SerializeOptions::new()
        .serialize_none_to_null(false)
        .serialize_unit_to_null(false);
    lua.to_value_with(v, opts)
}
