#!/usr/bin/env bash
# Call benchmark: SIPp's built-in uac calls through the server to SIPp's built-in uas on
# loopback. For Strowger and, in the same run, for Kamailio (a transaction-stateful
# record-routing proxy with a KEMI Lua dial plan doing the same routing), it measures:
#   - server CPU microseconds per completed call (utime+stime from /proc) over CALLS calls
#     at RATE calls per second;
#   - the highest sustained calls per second with under 0.1% failed calls (steps of STEP_S
#     seconds at rising rates);
#   - resident memory per established call, HELD calls held open.
# and prints each of ours as a ratio to Kamailio's.
#
# Usage: bash benches/calls.sh            (CALLS=10000 RATE=500 HELD=10000 by default;
#        BENCH_T1_MS sets Strowger's T1, e.g. to see memory without lingering transactions)
#        CALLS=2000 HELD=2000 SKIP_KAMAILIO=1 bash benches/calls.sh   (quick look)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CALLS=${CALLS:-10000}
RATE=${RATE:-500}
HELD=${HELD:-10000}
STEP_S=${STEP_S:-5}
RATES=${RATES:-"500 1000 1500 2000 3000 4000 5000 6000 8000"}
SKIP_KAMAILIO=${SKIP_KAMAILIO:-0}

need=()
command -v sipp >/dev/null || need+=(sip-tester)
if [ "$SKIP_KAMAILIO" != 1 ]; then
  command -v kamailio >/dev/null || need+=(kamailio)
  [ -e /usr/lib/x86_64-linux-gnu/kamailio/modules/app_lua.so ] || need+=(kamailio-lua-modules)
fi
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet

WORK=$(mktemp -d /tmp/strowger-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

UAS_PORT=$(free_port)
sipp -sn uas -i 127.0.0.1 -p "$UAS_PORT" -nostdin -bg >/dev/null 2>&1 || true
UAS_PID=$(pgrep -f "sipp -sn uas -i 127.0.0.1 -p $UAS_PORT" | head -1)
PIDS+=("$UAS_PID")

start_strowger() {
  local port=$1 http
  http=$(free_port)
  cat > "$WORK/plan.lua" <<LUA
-- Bench dial plan: every call to the one callee.
function on_invite(call)
  call:dial("sip:service@127.0.0.1:$UAS_PORT")
end
LUA
  cat > "$WORK/strowger.toml" <<TOML
[sip]
listen = ["udp:127.0.0.1:$port"]
[http]
listen = "127.0.0.1:$http"
[sip.timers]
t1_ms = ${BENCH_T1_MS:-500}
[log]
level = "warn"
[script]
path = "$WORK/plan.lua"
TOML
  "$ROOT/target/release/strowger" run --config "$WORK/strowger.toml" 2>"$WORK/strowger.log" &
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  wait_answering "$port"
}

start_kamailio() {
  local port=$1
  mkdir -p "$WORK/kam"
  sed -e "s|@LISTEN@|127.0.0.1:$port|" -e "s|@LUA@|$WORK/route.lua|" -e "s|@CHILDREN@|4|" \
    "$ROOT/benches/kamailio/kamailio.cfg.in" > "$WORK/kamailio.cfg"
  sed -e "s|@CALLEE@|127.0.0.1:$UAS_PORT|" "$ROOT/benches/kamailio/route.lua.in" > "$WORK/route.lua"
  kamailio -f "$WORK/kamailio.cfg" -D -E -Y "$WORK/kam" -P "$WORK/kam/kamailio.pid" \
    -m 512 -M 16 -w "$WORK/kam" 2>"$WORK/kamailio.log" &
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  wait_answering "$port"
}

run_uac() { # port calls rate extra... ; prints "successful failed"
  local port=$1 calls=$2 rate=$3; shift 3
  local uac_port stf
  uac_port=$(free_port)
  stf="$WORK/uac-$port-$rate-$calls.csv"
  rm -f "$stf"
  sipp -sn uac -s service -i 127.0.0.1 -p "$uac_port" -m "$calls" -r "$rate" -l $((rate * 4 + 100)) \
    -nostdin -timeout $((calls / rate + 60))s -trace_stat -stf "$stf" -fd 1 "$@" \
    127.0.0.1:"$port" >/dev/null 2>&1 || true
  echo "$(stat_col "$stf" 'SuccessfulCall(C)') $(stat_col "$stf" 'FailedCall(C)')"
}

measure() { # name port -> sets CPU_US MAX_CPS MEM_B
  local name=$1 port=$2 t0 t1 ok failed
  run_uac "$port" 500 250 >/dev/null   # warm-up
  t0=$(cpu_ticks "$SERVER_PID")
  read -r ok failed < <(run_uac "$port" "$CALLS" "$RATE")
  t1=$(cpu_ticks "$SERVER_PID")
  CPU_US=$(python3 -c "print(round(($t1-$t0)*1e6/$HZ/max($ok,1),1))")
  echo "$name: $ok calls ok, $failed failed at $RATE cps; CPU $CPU_US us/call" >&2
  MAX_CPS=0
  for r in $RATES; do
    read -r ok failed < <(run_uac "$port" $((r * STEP_S)) "$r")
    local total=$((ok + failed))
    if [ "$total" -gt 0 ] && python3 -c "import sys; sys.exit(0 if $failed*1000 < $total and $ok >= $((r * STEP_S * 99 / 100)) else 1)"; then
      MAX_CPS=$r
      echo "$name: $r cps sustained ($failed failed of $total)" >&2
    else
      echo "$name: $r cps not sustained ($failed failed of $total)" >&2
      break
    fi
  done
  local base held_rss uac_port
  # Memory on a fresh process, so that what the CPS steps left behind (and what the
  # allocator kept of it) does not hide in the baseline.
  kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
  "start_$name" "$port"
  sleep 2
  base=$(rss_kb "$SERVER_PID")
  uac_port=$(free_port)
  sipp -sn uac -s service -i 127.0.0.1 -p "$uac_port" -m "$HELD" -r 1000 -l "$HELD" -d 600000 127.0.0.1:"$port" \
    -nostdin -bg >/dev/null 2>&1 || true
  local held_pid
  held_pid=$(pgrep -f "sipp -sn uac -s service -i 127.0.0.1 -p $uac_port" | head -1 || true)
  PIDS+=("$held_pid")
  # Steady state: the set-up transactions have ended (RFC 6026 Timer L/M = 64*T1 = 32 s;
  # Kamailio's wait timer is shorter), only the established calls remain.
  sleep $(( HELD / 1000 + 40 ))
  held_rss=$(rss_kb "$SERVER_PID")
  kill "$held_pid" 2>/dev/null || true
  MEM_B=$(python3 -c "print(round(($held_rss-$base)*1024/$HELD))")
  echo "$name: RSS $base kB idle, $held_rss kB with $HELD calls up: $MEM_B B/call" >&2
  kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
}

PORT=$(free_port)
start_strowger "$PORT"
measure strowger "$PORT"
S_CPU=$CPU_US S_CPS=$MAX_CPS S_MEM=$MEM_B
if [ "$SKIP_KAMAILIO" != 1 ]; then
  PORT=$(free_port)
  start_kamailio "$PORT"
  measure kamailio "$PORT"
  K_CPU=$CPU_US K_CPS=$MAX_CPS K_MEM=$MEM_B
else
  K_CPU=0 K_CPS=0 K_MEM=0
fi
python3 - "$S_CPU" "$S_CPS" "$S_MEM" "$K_CPU" "$K_CPS" "$K_MEM" <<'PY'
import sys
s_cpu, s_cps, s_mem, k_cpu, k_cps, k_mem = map(float, sys.argv[1:])
def ratio(a, b): return f"{a/b:.2f}x" if b else "n/a"
print(f"{'figure':34} {'strowger':>10} {'kamailio':>10} {'ratio':>8} target")
print(f"{'CPU per call (us)':34} {s_cpu:>10.1f} {k_cpu:>10.1f} {ratio(s_cpu,k_cpu):>8} <= 0.5x")
print(f"{'max sustained calls/s (<0.1% fail)':34} {s_cps:>10.0f} {k_cps:>10.0f} {ratio(s_cps,k_cps):>8} >= 2x")
print(f"{'memory per established call (B)':34} {s_mem:>10.0f} {k_mem:>10.0f} {ratio(s_mem,k_mem):>8} <= 4096 B")
PY
