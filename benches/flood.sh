#!/usr/bin/env bash
# Bad-credential flood (issue 15 item 2): SOURCES SIPp instances (127.0.0.2, .3, ...), each
# running tests/sipp/register_wrong.xml (REGISTER, 401, REGISTER with a wrong password,
# ... 403) for a user of the server's users file at RATE scenarios/s for DURATION_S
# seconds. Prints the server's RSS before, at its peak during the flood and IDLE_S seconds
# after, the live transactions at their peak, and the REGISTER results (200, 401, 403).
# SIPp runs with -nd: by default it sends a BYE for each scenario it aborts (the 403), and
# those out-of-dialog BYEs (481 from a transaction) would be what the run measures.
# What should hold: memory and transactions stay flat while the flood goes on (challenges
# and refusals are stateless, nonces are not stored, failure counters are bounded).
#
# Usage: bash benches/flood.sh        (SOURCES=4 RATE=1000 DURATION_S=30 IDLE_S=40)
#        NO_BUILD=1 skips `cargo build --release`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SOURCES=${SOURCES:-4}
RATE=${RATE:-1000}
DURATION_S=${DURATION_S:-30}
IDLE_S=${IDLE_S:-40}
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
need_packages sipp
[ "${NO_BUILD:-0}" = 1 ] || cargo build --release --quiet
bench_setup flood
printf "[users.alice]\npassword = \"secret\"\n" > "$WORK/users.toml"
BENCH_EXTRA_TOML="[registrar]
users_file = \"$WORK/users.toml\"
${BENCH_EXTRA_TOML:-}"
PORT=$(free_port)
# The scenario registers at strowger.test.
export STROWGER_SIP__DOMAIN=strowger.test
start_strowger "$PORT"
metric() { curl -s "http://127.0.0.1:$HTTP_PORT/metrics" | awk -v m="$1" '$1==m{print $2+0}'; }
result() { curl -s "http://127.0.0.1:$HTTP_PORT/metrics" | awk -v r="$1" 'index($0, "strowger_register_results_total{result=\"" r "\"}")==1{print $2+0}'; }
sleep 1
RSS0=$(rss_kb "$SERVER_PID")
for i in $(seq 2 $((SOURCES + 1))); do
  sipp -sf "$ROOT/tests/sipp/register_wrong.xml" -s alice -ap wrong -i "127.0.0.$i" \
    -nd -p "$(free_port)" -r "$RATE" -m $((RATE * DURATION_S)) -l $((RATE * 10)) -nostdin \
    -timeout $((DURATION_S + 30))s 127.0.0.1:"$PORT" >/dev/null 2>&1 &
  PIDS+=("$!")
done
PEAK_RSS=$RSS0 PEAK_TX=0
for _ in $(seq 1 "$DURATION_S"); do
  sleep 1
  r=$(rss_kb "$SERVER_PID"); [ "$r" -gt "$PEAK_RSS" ] && PEAK_RSS=$r
  t=$(metric strowger_transactions); [ "${t%.*}" -gt "$PEAK_TX" ] && PEAK_TX=${t%.*}
done
for p in "${PIDS[@]:2}"; do kill "$p" 2>/dev/null || true; done
sleep "$IDLE_S"
echo "flood: $SOURCES sources x $RATE wrong-password registrations/s for ${DURATION_S}s"
echo "REGISTER results: ok $(result ok), challenged $(result challenged), forbidden $(result forbidden)"
echo "RSS: $((RSS0 / 1024)) MiB before, $((PEAK_RSS / 1024)) MiB at the peak, $(( $(rss_kb "$SERVER_PID") / 1024 )) MiB ${IDLE_S}s after"
echo "live transactions at the peak: $PEAK_TX; now: $(metric strowger_transactions)"
[ -n "${FLOOD_DUMP:-}" ] && curl -s "http://127.0.0.1:$HTTP_PORT/metrics" | grep -E "^strowger_(sip_re|transaction)" > "$FLOOD_DUMP"
