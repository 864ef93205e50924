#!/usr/bin/env bash
# Call set-up latency through the server under load (issue 14, target 4): SIPp's built-in uac
# loads the server at LOAD calls/s (half the highest sustained rate of benches/calls.sh) while
# benches/setup_probe.py makes PROBES calls one after the other and times INVITE sent -> 200
# received in microseconds. For Strowger and Kamailio (benches/kamailio/), in ROUNDS
# alternating rounds, each on a fresh server. Prints median, 99th percentile and maximum.
#
# Usage: bash benches/latency.sh          (LOAD=2000 PROBES=500 ROUNDS=2)
#        SKIP_KAMAILIO=1 NO_BUILD=1 ...
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LOAD=${LOAD:-2000}
PROBES=${PROBES:-500}
ROUNDS=${ROUNDS:-2}
SKIP_KAMAILIO=${SKIP_KAMAILIO:-0}

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
bench_start latency

servers=(strowger)
[ "$SKIP_KAMAILIO" = 1 ] || servers+=(kamailio)
printf '%-10s %5s %8s %10s %8s %8s %8s\n' server round "load/s" "probe ok" "median" p99 max
for round in $(seq 1 "$ROUNDS"); do
  for name in "${servers[@]}"; do
    port=$(free_port)
    "start_$name" "$port"
    run_uac "$port" 500 250 >/dev/null   # warm-up
    # The load runs for longer than the probe needs (about 2 ms per probe call).
    load_calls=$(( LOAD * (PROBES / 200 + 10) ))
    uac_port=$(free_port)
    sipp -sn uac -s service -i 127.0.0.1 -p "$uac_port" "${SIPP_BUF[@]}" -m "$load_calls" -r "$LOAD" \
      -l $((LOAD * 4 + 100)) -nostdin -bg 127.0.0.1:"$port" >/dev/null 2>&1 || true
    load_pid=$(pgrep -f "sipp -sn uac -s service -i 127.0.0.1 -p $uac_port" | head -1 || true)
    PIDS+=("$load_pid")
    sleep 2
    read -r _ ok median p99 max < <(timeout 300 python3 "$ROOT/benches/setup_probe.py" "$port" "$PROBES")
    printf '%-10s %5s %8s %10s %7sus %7sus %7sus\n' "$name" "$round" "$LOAD" "$ok/$PROBES" \
      "$median" "$p99" "$max"
    kill "$load_pid" 2>/dev/null || true
    kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
  done
done
