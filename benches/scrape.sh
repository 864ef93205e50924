#!/usr/bin/env bash
# Scrape benchmark (observability issue): what `GET /metrics` costs with many calls up,
# and whether a Prometheus-like 1 s scrape slows call handling.
#   1. HELD calls are set up through the server (SIPp uac -> Strowger -> SIPp uas) and
#      held; then SCRAPES scrapes of /metrics are timed (curl's time_total): median, p99,
#      max, plus the server CPU each scrape costs. Also one GET /calls for scale.
#   2. CPU per call: ROUNDS rounds of CALLS calls at RATE cps, alternating without and
#      with a scrape every second; server CPU (utime+stime from /proc) per call for
#      each, and the ratio with/without.
# Usage: bash benches/scrape.sh     (HELD=10000 SCRAPES=200 CALLS=5000 RATE=500 ROUNDS=2)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
HELD=${HELD:-10000}
SCRAPES=${SCRAPES:-200}
CALLS=${CALLS:-5000}
RATE=${RATE:-500}
ROUNDS=${ROUNDS:-2}
command -v sipp >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sip-tester >/dev/null
}
cargo build --release --quiet
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"

bench_setup scrape

PORT=$(free_port)
HTTP=$(free_tcp_port)
cat > "$WORK/plan.lua" <<LUA
function on_invite(call)
  call:set_route("bench")
  call:dial("sip:service@127.0.0.1:$UAS_PORT")
end
LUA
cat > "$WORK/strowger.toml" <<TOML
[sip]
listen = ["udp:127.0.0.1:$PORT"]
[http]
listen = "127.0.0.1:$HTTP"
[log]
level = "warn"
[script]
path = "$WORK/plan.lua"
[call]
routes = ["bench"]
TOML
start_server() {
  "$ROOT/target/release/strowger" run --config "$WORK/strowger.toml" 2>>"$WORK/strowger.log" &
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  wait_answering "$PORT"
}
start_server
METRICS="http://127.0.0.1:$HTTP/metrics"
active_calls() { curl -s "$METRICS" | awk '/^strowger_calls_active /{print $2}'; }

# 1. Many calls up.
uac_port=$(free_port)
sipp -sn uac -s service -i 127.0.0.1 -p "$uac_port" -m "$HELD" -r 1000 -l "$HELD" -d 600000 \
  -nostdin -bg 127.0.0.1:"$PORT" >/dev/null 2>&1 || true
HELD_PID=$(pgrep -f "sipp -sn uac -s service -i 127.0.0.1 -p $uac_port" | head -1)
PIDS+=("$HELD_PID")
for _ in $(seq 1 $(( HELD / 50 + 120 ))); do
  up=$(active_calls); [ "${up:-0}" -ge "$HELD" ] && break
  sleep 0.5
done
UP=$(active_calls)
t0=$(cpu_ticks "$SERVER_PID")
for _ in $(seq 1 "$SCRAPES"); do
  curl -s -o /dev/null -w '%{time_total}\n' "$METRICS"
done > "$WORK/scrape-times.txt"
t1=$(cpu_ticks "$SERVER_PID")
SIZE=$(curl -s "$METRICS" | wc -c)
CALLS_T=$(curl -s -o /dev/null -w '%{time_total}' "http://127.0.0.1:$HTTP/calls")
python3 - "$WORK/scrape-times.txt" "$UP" "$SIZE" "$(( t1 - t0 ))" "$HZ" "$SCRAPES" "$CALLS_T" <<'PY'
import sys, statistics
times = sorted(float(l) * 1000 for l in open(sys.argv[1]) if l.strip())
up, size, ticks, hz, n, calls_t = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
print(f"scrape with {up} calls up: median {statistics.median(times):.2f} ms, p99 {p99:.2f} ms, "
      f"max {times[-1]:.2f} ms (target < 10 ms); {size} bytes; "
      f"server CPU {ticks * 1e6 / hz / n:.0f} us per scrape; GET /calls {calls_t * 1000:.1f} ms")
PY
# The held calls stay up on the server when SIPp goes: restart it for a clean comparison.
kill "$HELD_PID" 2>/dev/null || true
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
start_server

# 2. CPU per call without and with a 1 s scrape.
run_calls() { # -> "ok cpu_us_per_call"
  local uac_port stf t0 t1 ok
  uac_port=$(free_port)
  stf="$WORK/uac-$RANDOM.csv"
  t0=$(cpu_ticks "$SERVER_PID")
  sipp -sn uac -s service -i 127.0.0.1 -p "$uac_port" -m "$CALLS" -r "$RATE" -l $((RATE * 4)) \
    -nostdin -timeout $((CALLS / RATE + 60))s -trace_stat -stf "$stf" -fd 1 \
    127.0.0.1:"$PORT" >/dev/null 2>&1 || true
  t1=$(cpu_ticks "$SERVER_PID")
  ok=$(stat_col "$stf" 'SuccessfulCall(C)')
  python3 -c "print($ok, round(($t1-$t0)*1e6/$HZ/max($ok,1),1))"
}
scraper() { while true; do curl -s -o /dev/null "$METRICS"; sleep 1; done; }
run_calls >/dev/null   # warm-up
OFF=() ON=()
for round in $(seq 1 "$ROUNDS"); do
  read -r ok cpu < <(run_calls); OFF+=("$cpu")
  echo "round $round without scrape: $ok calls, $cpu us/call" >&2
  scraper & SCRAPER=$!; PIDS+=("$SCRAPER")
  read -r ok cpu < <(run_calls); ON+=("$cpu")
  echo "round $round with a 1 s scrape: $ok calls, $cpu us/call" >&2
  kill "$SCRAPER" 2>/dev/null || true; wait "$SCRAPER" 2>/dev/null || true
done
python3 - "${OFF[*]}" "${ON[*]}" <<'PY'
import sys, statistics
off = [float(x) for x in sys.argv[1].split()]
on = [float(x) for x in sys.argv[2].split()]
a, b = statistics.mean(off), statistics.mean(on)
print(f"CPU per call: {a:.1f} us without scrape, {b:.1f} us with a 1 s scrape: {b/a:.3f}x")
PY
