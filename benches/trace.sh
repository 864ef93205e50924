#!/usr/bin/env bash
# What the call ladders (GET /calls/{id}/trace) cost: server CPU per call with
# `call.trace = true` and `false`, ROUNDS alternating rounds of CALLS calls at RATE cps
# (SIPp uac -> Strowger -> SIPp uas on loopback; utime+stime from /proc).
# Usage: bash benches/trace.sh      (CALLS=5000 RATE=500 ROUNDS=2)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CALLS=${CALLS:-5000}
RATE=${RATE:-500}
ROUNDS=${ROUNDS:-2}
command -v sipp >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sip-tester >/dev/null
}
cargo build --release --quiet
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
bench_setup trace
echo "function on_invite(call) call:dial(\"sip:service@127.0.0.1:$UAS_PORT\") end" > "$WORK/plan.lua"

run() { # call.trace -> server CPU microseconds per call
  local port http stf t0 t1 ok
  port=$(free_port); http=$(free_tcp_port)
  cat > "$WORK/strowger.toml" <<TOML
[sip]
listen = ["udp:127.0.0.1:$port"]
[http]
listen = "127.0.0.1:$http"
[log]
level = "warn"
[script]
path = "$WORK/plan.lua"
[call]
trace = $1
TOML
  "$ROOT/target/release/strowger" run --config "$WORK/strowger.toml" 2>>"$WORK/strowger.log" &
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  wait_answering "$port"
  sipp -sn uac -s service -i 127.0.0.1 -p "$(free_port)" -m 500 -r 250 -nostdin \
    127.0.0.1:"$port" >/dev/null 2>&1 || true   # warm-up
  stf="$WORK/uac-$RANDOM.csv"
  t0=$(cpu_ticks "$SERVER_PID")
  sipp -sn uac -s service -i 127.0.0.1 -p "$(free_port)" -m "$CALLS" -r "$RATE" -l $((RATE * 4)) \
    -nostdin -timeout $((CALLS / RATE + 60))s -trace_stat -stf "$stf" -fd 1 \
    127.0.0.1:"$port" >/dev/null 2>&1 || true
  t1=$(cpu_ticks "$SERVER_PID")
  ok=$(stat_col "$stf" 'SuccessfulCall(C)')
  kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
  python3 -c "print(round(($t1-$t0)*1e6/$HZ/max($ok,1),1))"
}
ON=() OFF=()
for i in $(seq 1 "$ROUNDS"); do
  ON+=("$(run true)"); OFF+=("$(run false)")
  echo "round $i: trace on ${ON[-1]} us/call, off ${OFF[-1]} us/call" >&2
done
python3 - "${ON[*]}" "${OFF[*]}" <<'PY'
import sys, statistics
on = [float(x) for x in sys.argv[1].split()]
off = [float(x) for x in sys.argv[2].split()]
a, b = statistics.mean(on), statistics.mean(off)
print(f"CPU per call: {a:.1f} us with call.trace, {b:.1f} us without: {a/b:.3f}x")
PY
