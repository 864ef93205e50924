-- Strowger sandbox prelude: runs once in every VM, before the operator's script.
-- Receives the Rust helpers; returns the metatable of `call` objects.
local H = ...

local error, select, type, tostring = error, select, type, tostring
local raw_pcall, raw_xpcall, raw_load, raw_collect = pcall, xpcall, load, collectgarbage
local raw_setmetatable, raw_rawset = setmetatable, rawset
local raw_resume = coroutine.resume
-- The verbs that wait (dial, hunt, transfer, huntgroup.set_state) return WAIT when they
-- have handed Rust what to wait for: the hook's coroutine then yields to Rust, which
-- resumes it with the verb's results (src/script/wait.rs).
local WAIT, yield, running = H.wait, coroutine.yield, coroutine.running
local exhausted, set_env = H.exhausted, H.set_env

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
-- Lua calls the message handler for every error raised while it runs, including the
-- budget error the count hook raises inside it, and then with hooks off: a handler that
-- loops would never stop. Once the budget is spent, the handler is skipped.
function xpcall(f, handler, ...)
  if type(handler) ~= "function" then
    error("bad argument #2 to 'xpcall' (function expected, got " .. type(handler) .. ")", 2)
  end
  local function guarded(...)
    if exhausted() then
      return (...)
    end
    return handler(...)
  end
  return rethrow_budget(raw_xpcall(f, guarded, ...))
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
-- The location service: registrar.lookup(aor) -> { contact URI, ... }, best first.
registrar = { lookup = H.registrar_lookup }
-- Hunt groups: huntgroup.agents(name) -> { { agent, state, presence, missed, answered,
-- last_end }, ... }; huntgroup.set_state(agent, "available" | "paused" | "logged-out").
local raw_agents, raw_set_state = H.huntgroup_agents, H.huntgroup_set_state
huntgroup = {
  agents = function(name)
    local err, list = raw_agents(name)
    if err then error(err, 2) end
    return list
  end,
  set_state = function(agent, state)
    local err = raw_set_state(agent, state, (running()))
    if err == WAIT then
      err = yield()
    end
    if err then error(err, 2) end
    return true
  end,
}
local raw_hunt = H.call_hunt

-- Read-only standard tables: a hook cannot change what the next call sees. The script's
-- top-level code may still add to them (e.g. `function string.trim(s) ... end`).
local loading = true
local frozen = raw_setmetatable({}, { __mode = "k" })
local next_raw = next
local function read_only(t, name)
  local proxy = raw_setmetatable({}, {
    __index = t,
    __newindex = function(_, k, v)
      if loading then
        raw_rawset(t, k, v)
        return
      end
      error("'" .. name .. "' is read-only in a hook (cannot set '" .. tostring(k) .. "')", 2)
    end,
    __pairs = function()
      return next_raw, t, nil
    end,
    __len = function()
      return #t
    end,
    __metatable = "read-only",
  })
  frozen[proxy] = true
  return proxy
end
-- Strings share one metatable: keep scripts away from it (its __index is the real
-- `string` table, reachable only through method calls on strings).
getmetatable("").__metatable = "read-only"
string = read_only(string, "string")
table = read_only(table, "table")
math = read_only(math, "math")
utf8 = read_only(utf8, "utf8")
coroutine = read_only(coroutine, "coroutine")
os = read_only(os, "os")
log = read_only(log, "log")
print = log.info
registrar = read_only(registrar, "registrar")
huntgroup = read_only(huntgroup, "huntgroup")

-- Finalizers run with the instruction hook off: a looping __gc could never be stopped.
function setmetatable(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("setmetatable: __gc finalizers are not allowed in a dial plan", 2)
  end
  return raw_setmetatable(t, mt)
end
function rawset(t, k, v)
  if frozen[t] then
    error("rawset: the table is read-only in a hook", 2)
  end
  return raw_rawset(t, k, v)
end

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

-- The `call` object is a plain table with `call_meta`: Rust makes it as on_invite starts,
-- in the one protected call it needs anyway (with `ruri`, and its private record naming a
-- handle: a light userdata for the call's state), since every crossing of the Rust/Lua
-- boundary is costly (each one is a protected call when a memory limit is set). The other
-- fields are filled on first access (__index), and the outcome tables are built here from
-- plain values.
local raw = H.call
local raw_header, raw_reject, raw_redirect, raw_dial, raw_field =
  raw.header, raw.reject, raw.redirect, raw.dial, raw.field
local raw_authenticate, raw_set_route, raw_transfer = raw.authenticate, raw.set_route, raw.transfer
-- The raw `rawset` and `setmetatable` (not the checking ones above, which guard the frozen
-- tables and __gc): the sandbox's own tables are neither, and a call's lazy fields are
-- stored with `rawset`.
local rawget, next = rawget, next
local rawset, setmetatable = raw_rawset, raw_setmetatable
-- The standard reason phrase of every status 100-699: a dial or transfer whose answer
-- carried it gets it from here rather than as a new string from Rust.
local REASONS = raw.reasons

-- call -> its private record { handle, hook coroutine, built fields }, weak-keyed. Rust
-- makes a call's table and record as its on_invite starts (new_call_table in
-- src/script/call.rs); when the script defines on_refer or on_call_end, it keeps the call
-- table (a registry reference) until the call is over and hands it to those hooks.
-- One record per call rather than one table per fact: every entry in a weak table costs
-- insertion, rehashing and GC traversal.
--
-- The hook coroutine: `call:dial` waits by yielding it, so it must not be called from a
-- coroutine the script created (nor from another call's hook).
local UD, THREAD, MADE = 1, 2, 3
local private = setmetatable({}, { __mode = "k" })

local function usage(verb)
  return "call:" .. verb .. ": expected a call object (write call:" .. verb .. "(...), with a colon)"
end

-- The call's private record for `verb`; raises (at the script's line) when `self` is not
-- a call, or, for verbs that wait, when called outside the call's own hook coroutine.
local function private_of(self, verb, waits)
  local p = private[self]
  if p == nil then
    error(usage(verb), 3)
  end
  if waits then
    local owner = p[THREAD]
    if owner ~= nil and owner ~= running() then
      error("call:" .. verb .. ": must be called from the call's own hook, not from another coroutine", 3)
    end
  end
  return p
end

-- Where a dial's status came from (DialSource in src/script/mod.rs, same order).
local SOURCES = { [0] = "callee", "timeout", "caller", "local" }

-- What a dial or transfer returned -> its outcome table, after waiting (yielding the hook's
-- coroutine) if it must. Called in tail position, so that level 2 is the script's line.
-- (code, reason) or (nil, error message): the code packs answered, status, source and
-- which target answered (outcome_code in src/script/call.rs: 0 none, 1 what was dialled,
-- n + 1 the nth of the list dialled); `targets` is what the script dialled, to name that
-- target.
local function outcome(r, reason, targets)
  if r == WAIT then
    r, reason = yield()
  end
  if r == nil then
    error(reason, 2)
  end
  local t = r // 8192
  local target = nil
  if t == 1 then
    target = targets
  elseif t > 1 then
    -- Present raw: Rust read the list raw.
    target = targets[t - 1]
  end
  local status = (r // 2) % 1024
  return {
    answered = r % 2 == 1,
    status = status,
    reason = reason or REASONS[status],
    source = SOURCES[(r // 2048) % 4],
    target = target,
  }
end

local methods = {
  header = function(self, name)
    local p = private_of(self, "header")
    local err, value = raw_header(p[UD], name)
    if err then
      error(err, 2)
    end
    return value
  end,
  -- The hot verb, written out: every Lua instruction and call here is paid by every call
  -- that dials (the count hook runs at each), so private_of and the check for unknown
  -- options are inlined (same checks, same messages, raised at the script's line); the
  -- wait and the outcome are one tail call.
  dial = function(self, target, opts)
    local p = private[self]
    if p == nil then
      error(usage("dial"), 2)
    end
    local owner = p[THREAD]
    if owner ~= nil and owner ~= running() then
      error("call:dial: must be called from the call's own hook, not from another coroutine", 2)
    end
    -- The options are read raw (as the Rust side reads them, metatable or not) in the one
    -- pass that checks their names: a field read that misses (most options are absent)
    -- is a C call each.
    local known = type(opts) == "table"
    local timeout, headers, from, to, max_duration, caller_id, privacy
    if known then
      for k, v in next, opts do
        if k == "timeout" then
          timeout = v
        elseif k == "headers" then
          headers = v
        elseif k == "from" then
          from = v
        elseif k == "to" then
          to = v
        elseif k == "max_duration" then
          max_duration = v
        elseif k == "caller_id" then
          caller_id = v
        elseif k == "privacy" then
          privacy = v
        else
          known = false
          break
        end
      end
    end
    local r, reason
    if known then
      r, reason = raw_dial(p[UD], target, nil, timeout, headers, from, to, max_duration,
        caller_id, privacy)
    else
      -- Anything unusual (unknown keys, not a table): the Rust side reads the table itself
      -- (raw) and says what is wrong.
      r, reason = raw_dial(p[UD], target, opts)
    end
    return outcome(r, reason, target)
  end,
  -- call:hunt(group, opts) -> { answered, status, reason, agent, queued, waited,
  -- overflow, abandoned }: waits (yields) like call:dial.
  hunt = function(self, name, opts)
    local p = private_of(self, "hunt", true)
    local err, result = raw_hunt(p[UD], name, opts)
    if err == WAIT then
      err, result = yield()
    end
    if err then
      error(err, 2)
    end
    return result
  end,
  -- The caller's user name when its INVITE carries valid credentials; otherwise nil,
  -- and the caller has been answered 407 with a challenge (or 403): just return.
  authenticate = function(self)
    local p = private_of(self, "authenticate")
    local user, err = raw_authenticate(p[UD])
    if err then
      error(err, 2)
    end
    return user
  end,
  -- Connects a party of the answered call (the caller unless opts.party = "callee") to
  -- target and releases the other; returns an outcome like call:dial's.
  transfer = function(self, target, opts)
    local p = private_of(self, "transfer", true)
    local party = nil
    if type(opts) == "table" then
      party = rawget(opts, "party")
    elseif opts ~= nil then
      error("call:transfer: options must be a table", 2)
    end
    local r, reason = raw_transfer(p[UD], target, party)
    return outcome(r, reason, target)
  end,
  -- Tags the call with a route name from call.routes (metrics label); true, or nil and
  -- the reason when the name is not configured.
  set_route = function(self, name)
    local p = private_of(self, "set_route")
    return raw_set_route(p[UD], name)
  end,
  reject = function(self, code, reason)
    local p = private_of(self, "reject")
    local err = raw_reject(p[UD], code, reason)
    if err then
      error(err, 2)
    end
    return nil
  end,
  redirect = function(self, contacts)
    local p = private_of(self, "redirect")
    local err = raw_redirect(p[UD], contacts)
    if err then
      error(err, 2)
    end
    return nil
  end,
}

-- The lazily built fields, each with its bit in the record's MADE: once built (or
-- assigned by the script), a field is never built again, so `call.vars = nil` stays nil as
-- it would with a plain table.
local lazy_bit = { id = 1, source = 2, from = 4, to = 8, ruri = 16, vars = 32, trunk = 64 }
-- A new call table holds `ruri` from the start: Rust sets its bit (RURI_BIT in
-- src/script/call.rs) in the record it makes.

local function index(c, k)
  local m = methods[k]
  if m ~= nil then
    return m
  end
  local bit = lazy_bit[k]
  if bit == nil then
    return nil
  end
  local p = private[c]
  if p == nil then
    return nil
  end
  local done = p[MADE]
  if done & bit ~= 0 then
    return nil
  end
  p[MADE] = done | bit
  if bit == 32 then
    local vars = {}
    rawset(c, k, vars)
    return vars
  end
  -- A string (id, source, trunk) or a table { uri, user, host } (from, to, ruri), which
  -- Rust also stores in `c` (raw) as it makes it (bits as in lazy_bit).
  return raw_field(p[UD], bit, c)
end

local call_meta = {
  __index = index,
  __newindex = function(c, k, v)
    local bit = lazy_bit[k]
    local p = private[c]
    if bit ~= nil and p ~= nil then
      p[MADE] = p[MADE] | bit
    end
    rawset(c, k, v)
  end,
  -- pairs sees every field, as if they had been there from the start.
  __pairs = function(c)
    for k in next, lazy_bit do
      index(c, k)
    end
    return next, c, nil
  end,
  __metatable = "call",
  __tostring = function(c)
    return "call " .. tostring(c.id)
  end,
}

-- on_register(req): a plain table per REGISTER. The hook refuses with req:reject(code,
-- reason), gives credentials by returning { password = ... } (or ha1_md5 / ha1_sha256),
-- or returns nothing (the users file decides).
local lower = string.lower
local function register_runner(on_register)
  return function(user, aor, source, user_agent, contact, headers)
    local verdict
    local req = {
      user = user,
      aor = aor,
      source = source,
      user_agent = user_agent,
      contact = contact,
      header = function(_, name)
        return headers[lower(name)]
      end,
      reject = function(_, code, reason)
        verdict = { code, reason }
      end,
    }
    local creds = on_register(req)
    if verdict then
      return "reject", verdict[1], verdict[2]
    end
    if type(creds) == "table" then
      return "credentials", creds.password, creds.ha1_md5, creds.ha1_sha256
    end
    return nil
  end
end

-- on_refer(call, refer): the call's own `call` object and a plain table for the transfer.
-- The hook denies with refer:deny(code, reason), rewrites refer.target or
-- refer.referred_by, or returns nothing (the transfer goes ahead).
local function refer_runner(on_refer)
  return function(call, by, target, referred_by, replaces)
    private[call][THREAD] = running()
    local verdict
    local refer = {
      by = by,
      target = target,
      referred_by = referred_by,
      replaces = replaces,
      deny = function(_, code, reason)
        verdict = { code or 603, reason }
      end,
    }
    on_refer(call, refer)
    if verdict then
      return "deny", verdict[1], verdict[2]
    end
    return "allow", refer.target, refer.referred_by
  end
end

-- The runners Rust starts as coroutines, with the operator's hooks bound once per VM.
-- Then the globals are frozen: they move into `base`, the global table stays empty, and
-- its metatable reads through to `base`. A hook run's first global assignment makes the
-- run its own table of globals (reading through to `base`), which Rust points the global
-- table at whenever that run executes: each call sees the globals as the top-level code
-- left them.
local function bind(hooks)
  local runners = {}
  local on_invite, on_call_end = hooks.on_invite, hooks.on_call_end
  if hooks.on_register ~= nil then
    runners.on_register = register_runner(hooks.on_register)
  end
  if hooks.on_refer ~= nil then
    runners.on_refer = refer_runner(hooks.on_refer)
  end
  runners.on_message = hooks.on_message
  runners.on_subscribe = hooks.on_subscribe
  -- on_invite is given the call table Rust made (with its private record): it is its
  -- own runner.
  runners.on_invite = on_invite
  if on_call_end ~= nil then
    runners.on_call_end = function(call, start, answer, ends, duration, hangup_by, final_status)
      private[call][THREAD] = running()
      return on_call_end(call, {
        start = start,
        answer = answer,
        ends = ends,
        duration = duration,
        hangup_by = hangup_by,
        final_status = final_status,
      })
    end
  end

  loading = false
  local G = _G
  local base = {}
  for k, v in next_raw, G do
    base[k] = v
  end
  for k in next_raw, base do
    raw_rawset(G, k, nil)
  end
  local env_meta = { __index = base, __metatable = "globals" }
  local gmeta = { __index = base, __metatable = "globals" }
  local function first_global(_, k, v)
    local env = raw_setmetatable({}, env_meta)
    raw_rawset(env, k, v)
    if not set_env(env) then
      error("cannot set global '" .. tostring(k) .. "' outside a hook", 2)
    end
    gmeta.__index = env
    gmeta.__newindex = env
  end
  gmeta.__newindex = first_global
  raw_setmetatable(G, gmeta)
  frozen[G] = true
  return runners, gmeta, base, first_global, call_meta, private
end

return bind
