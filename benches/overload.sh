#!/usr/bin/env bash
# Overload run (issue 15): SIPp's built-in uac offers Strowger 1x, 2x and 3x a base rate
# (its highest sustained rate from benches/calls.sh on this machine) for STEP_S seconds
# each, through to SIPp's built-in uas. Per step: calls completed per second (and as a
# share of the base rate), new calls refused with 503 (strowger_overload_refused_total)
# and SIPp's retransmissions. A fresh server per step.
#
# Usage: bash benches/overload.sh            (BASE=4000 STEP_S=10)
#        BASE=2000 STEP_S=5 NO_BUILD=1 bash benches/overload.sh   (quick look)
#        BENCH_EXTRA_TOML='[call]
#        overload_delay_ms = 0' bash benches/overload.sh   (without the overload control)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source benches/lib.sh
SKIP_KAMAILIO=1
BASE=${BASE:-4000}
STEP_S=${STEP_S:-10}
bench_start overload

refused_total() {
  curl -s "127.0.0.1:$HTTP_PORT/metrics" | awk '/^strowger_overload_refused_total/{print $2+0}' || echo 0
}

# Goodput: calls SIPp completed within the offered window plus 5 s (read from its
# statistics file, written every second), per second offered. SIPp is stopped then:
# what was not done by then does not count, however it would have ended.
printf '%-8s %12s %9s %9s %9s\n' offered "completed/s" "of base" "503s" "retrans"
for mult in 1 2 3; do
  rate=$((BASE * mult))
  port=$(free_port)
  start_strowger "$port"
  before=$(refused_total)
  uac_port=$(free_port)
  stf="$WORK/overload-$rate.csv"
  sipp -sn uac -s service -i 127.0.0.1 -p "$uac_port" -m $((rate * STEP_S)) -r "$rate" \
    -l $((rate * 4 + 100)) -nostdin -trace_stat -stf "$stf" -fd 1 -bg \
    127.0.0.1:"$port" >/dev/null 2>&1 || true
  sleep 1
  uac_pid=$(pgrep -f "sipp -sn uac -s service -i 127.0.0.1 -p $uac_port" | head -1 || true)
  [ -n "$uac_pid" ] && PIDS+=("$uac_pid")
  sleep $((STEP_S + 4))
  ok=$(stat_col "$stf" 'SuccessfulCall(C)')
  retrans=$(stat_col "$stf" 'Retransmissions(C)')
  shed=$(( $(refused_total) - before ))
  [ -n "$uac_pid" ] && kill "$uac_pid" 2>/dev/null || true
  python3 -c "
ok, rate, base, win, shed, retrans = $ok, $rate, $BASE, $STEP_S + 5, $shed, $retrans
print(f'{rate:<8} {ok / (win - 5):>12.0f} {ok / (win - 5) / base:>9.0%} {shed:>9} {retrans:>9}')"
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  sleep 1
done
