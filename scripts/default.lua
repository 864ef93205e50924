-- Strowger default dial plan: a small office PBX.
--
--   * internal extensions 1000-1099 ring the phone listed in `extensions`;
--   * "9" + a number goes out through the trunk "carrier", and through the trunk "backup"
--     when the first fails (but not when the called party is busy or declines); both are
--     `[trunks.<name>]` tables of the configuration (config/strowger.toml has an example):
--     without them outside calls fail with 404 "No trunk named ...";
--   * anything else is rejected with "404 No such extension".
--
-- The hooks and the `call` API are described in docs/lua-api.md. Edit the tables below,
-- check with `strowger check` (it compiles the configured script), then reload the script (or restart):
-- calls in progress finish on the old version, new calls use the new one. A version that
-- does not compile is refused and the running one stays.

-- Phones that register are found by the registrar (registrar.lookup below). This table is
-- for phones that do not register: where each extension's phone is. Operators: add,
-- remove or change lines here.
local extensions = {
  ["1000"] = "sip:1000@127.0.0.1:5080",
  ["1001"] = "sip:1001@127.0.0.1:5080",
  ["1002"] = "sip:1002@127.0.0.1:5080",
  ["1099"] = "sip:1099@127.0.0.1:5080", -- the front desk
}
-- Or fill a whole range at once:
-- for n = 1000, 1099 do extensions[tostring(n)] = "sip:" .. n .. "@127.0.0.1:5080" end

-- Outgoing calls: the carrier's SIP trunk, and the one to use when it fails (names of
-- [trunks.<name>] in the configuration).
local TRUNKS = { "carrier", "backup" }
-- The caller ID presented on the trunks (nil: the caller's own user part, e.g. 1001).
local CALLER_ID = nil

-- Seconds to let a phone ring before giving up.
local RING_TIMEOUT = 20
-- Longest outside call, in seconds (a runaway call on a trunk costs money).
local MAX_OUTSIDE_CALL = 4 * 3600

-- Should a failed trunk dial be retried on the next trunk? `result.source` says where the
-- failure came from (docs/lua-api.md, call:dial):
--   "caller"  the caller hung up: nobody is left to connect, never try again;
--   "timeout" nobody answered in time on this trunk: try the next;
--   "local"   this trunk could not be tried (down, at its max_channels, not configured,
--             its address does not resolve): try the next;
--   "callee"  the trunk's answer: try the next, except for "busy" (486) or a global
--             failure (6xx, e.g. 603 Decline), which another trunk would give again.
local function worth_another_trunk(result)
  if result.answered or result.source == "caller" then
    return false
  end
  if result.source == "callee" then
    return result.status ~= 486 and result.status < 600
  end
  return true
end

-- Dial `number` through each trunk in turn until one answers.
local function dial_out(call, number)
  for _, trunk in ipairs(TRUNKS) do
    local result = call:dial({ trunk = trunk, user = number }, {
      timeout = 60,
      max_duration = MAX_OUTSIDE_CALL,
      caller_id = CALLER_ID,
    })
    if result.answered then
      call.vars.trunk = trunk
      return
    end
    log.warn("trunk", trunk, "failed for", number, result.status, result.reason)
    if not worth_another_trunk(result) then
      -- Returning without a decision answers the caller with this dial's status
      -- (e.g. 486 Busy Here).
      return
    end
  end
  -- All trunks failed: the caller gets the last trunk's status.
end

function on_invite(call)
  -- The dialled number: the user part of the request URI.
  local number = call.ruri.user
  if not number then
    return call:reject(484, "Address Incomplete")
  end
  log.info("call", call.id, "from", call.from.uri, "to", number, "via", call.source)

  -- Internal extension: every device registered for it rings at once (the first to
  -- answer wins); a fixed phone from the `extensions` table when none is registered.
  local devices = registrar.lookup("sip:" .. number .. "@" .. call.ruri.host)
  local phone = extensions[number]
  if #devices > 0 or phone then
    call.vars.route = "extension " .. number
    local result = call:dial(#devices > 0 and devices or phone, { timeout = RING_TIMEOUT })
    if not result.answered then
      -- No decision: the caller hears the phone's answer (486 Busy Here, 480, ...).
      log.info("extension", number, "did not answer:", result.status, result.reason)
    end
    return
  end

  -- Outside line: 9 + the number (digits, optionally with a leading +).
  local outside = number:match("^9(%+?%d+)$")
  if outside then
    call.vars.route = "outside " .. outside
    return dial_out(call, outside)
  end

  log.info("no route for", number)
  call:reject(404, "No such extension")
end

function on_call_end(call, record)
  local talk = record.answer and string.format("%.1fs", record.duration) or "unanswered"
  log.info(
    "call", call.id, "ended:", call.vars.route or "no route",
    "status", record.final_status, "talk", talk,
    "hung up by", record.hangup_by,
    call.vars.trunk and ("trunk " .. call.vars.trunk) or ""
  )
end
