-- Strowger sandbox prelude: runs once in every VM, before the operator's script.
-- Receives the Rust helpers; returns the metatable of `call` objects.
local H = ...

local error, select, type, tostring = error, select, type, tostring
local raw_pcall, raw_xpcall, raw_load, raw_collect = pcall, xpcall, load, collectgarbage
local raw_resume = coroutine.resume
local exhausted = H.exhausted

-- An exhausted instruction budget must end the hook: protected calls rethrow it.
local function rethrow_budget(ok, ...)
  if not ok and exhausted() then
    error((...), 0)
  end
  return ok, ...
end
function pcall(f, ...)
  return rethrow_budget(raw_pcall(f, ...))
end
function xpcall(f, handler, ...)
  return rethrow_budget(raw_xpcall(f, handler, ...))
end
coroutine.resume = function(co, ...)
  return rethrow_budget(raw_resume(co, ...))
end

-- Text chunks only (binary chunks can crash the VM).
function load(chunk, name, _mode, ...)
  if select("#", ...) > 0 then
    return raw_load(chunk, name, "t", ...)
  end
  return raw_load(chunk, name, "t")
end

function collectgarbage(opt, ...)
  if opt == nil or opt == "collect" or opt == "count" or opt == "step" then
    return raw_collect(opt, ...)
  end
  error("collectgarbage('" .. tostring(opt) .. "') is not allowed in a dial plan", 2)
end

local os_lib = os
os = { time = os_lib.time, clock = os_lib.clock, date = os_lib.date, difftime = os_lib.difftime }
dofile, loadfile, warn, io, debug, package = nil, nil, nil, nil, nil, nil
string.dump = nil

log = H.log
print = H.log.info

-- require "name": <script dir>/name.lua, once per VM.
local loaded = { string = string, table = table, math = math, utf8 = utf8, coroutine = coroutine }
local find_module = H.find_module
function require(name)
  local value = loaded[name]
  if value ~= nil then
    return value
  end
  local chunk, err = find_module(name)
  if not chunk then
    error(err, 2)
  end
  value = chunk(name)
  if value == nil then
    value = true
  end
  loaded[name] = value
  return value
end

-- call methods: the Rust side returns (error message) or (nil, result); errors are raised
-- here so they carry the caller's file:line and are plain strings for pcall.
local raw = H.call
local function method(f)
  return function(...)
    local err, result = f(...)
    if err then
      error(err, 2)
    end
    return result
  end
end

-- call -> the coroutine running its hook. `call:dial` waits by yielding that coroutine,
-- so it must not be called from a coroutine the script created (nor from another call's
-- hook).
local hook_thread = setmetatable({}, { __mode = "k" })
local running = coroutine.running
local raw_dial = method(raw.dial)

local function run_hook(hook, call, ...)
  hook_thread[call] = running()
  return hook(call, ...)
end

local methods = {
  header = method(raw.header),
  dial = function(self, ...)
    local owner = hook_thread[self]
    if owner ~= nil and owner ~= running() then
      error("call:dial: must be called from the call's own hook, not from another coroutine", 2)
    end
    return raw_dial(self, ...)
  end,
  reject = method(raw.reject),
  redirect = method(raw.redirect),
}

local call_meta = {
  __index = methods,
  __metatable = "call",
  __tostring = function(c)
    return "call " .. tostring(rawget(c, "id"))
  end,
}

return call_meta, run_hook
