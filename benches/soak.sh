#!/usr/bin/env bash
# Soak (issue 15 item 6): DURATION_S (3600) of mixed traffic against one release server,
# sampling its RSS, open descriptors, active calls and CPU every SAMPLE_S (10) seconds:
#   calls      SIPp's uac -> Strowger -> SIPp's uas, CALL_RATE calls/s (2000: half the
#              highest sustained rate of benches/calls.sh);
#   registers  REG_RATE REGISTERs/s (50) from 10,000 phones of an injection file;
#   presence   PRES_RATE/s (2) each of tests/sipp/pres_publish.xml (PUBLISH lifecycle) and
#              tests/sipp/pres_watch.xml (SUBSCRIBE lifecycle);
#   transfers  XFER_RATE/s (2) blind transfers by the callee (tests/sipp/uac_reinvited.xml,
#              uas_refer.xml, uas_target.xml).
# Pass: after the warm-up (the first WARM_PCT, 10%, of the run, at least 60 s: a call's
# transactions linger 32 s after it, RFC 6026 Timer L/M) RSS grows by at most
# RSS_BOUND_PCT (10%); descriptors at the end (idle) are no more than at the start + 5;
# every call the server started has its line in call.records_file; no stream failed more
# than 0.1% of its calls. Prints the samples and a summary; exit 1 when a check fails.
#
# Usage: bash benches/soak.sh
#        DURATION_S=600 CALL_RATE=500 bash benches/soak.sh   (a shorter look)
#        NO_BUILD=1 skips `cargo build --release`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION_S=${DURATION_S:-3600}
CALL_RATE=${CALL_RATE:-2000}
REG_RATE=${REG_RATE:-50}
PRES_RATE=${PRES_RATE:-2}
XFER_RATE=${XFER_RATE:-2}
SAMPLE_S=${SAMPLE_S:-10}
WARM_PCT=${WARM_PCT:-10}
RSS_BOUND_PCT=${RSS_BOUND_PCT:-10}

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
need_packages sipp
[ "${NO_BUILD:-0}" = 1 ] || cargo build --release --quiet
bench_setup soak
SC="$ROOT/tests/sipp"
XB=$(free_port)
XC=$(free_port)
PORT=$(free_port)
HTTP=$(free_tcp_port)
cat > "$WORK/plan.lua" <<LUA
-- Soak dial plan: "xfer" calls go to the callee that transfers, the rest to SIPp's uas.
function on_invite(call)
  if call.ruri.user == "xfer" then
    call:dial("sip:callee@127.0.0.1:$XB")
  else
    call:dial("sip:service@127.0.0.1:$UAS_PORT")
  end
end
LUA
cat > "$WORK/strowger.toml" <<TOML
[sip]
listen = ["udp:127.0.0.1:$PORT"]
domain = "strowger.test"
[http]
listen = "127.0.0.1:$HTTP"
[log]
level = "warn"
[script]
path = "$WORK/plan.lua"
[storage]
dir = "$WORK/data"
[call]
records_file = "$WORK/calls.jsonl"
TOML
"$ROOT/target/release/strowger" run --config "$WORK/strowger.toml" 2>>"$WORK/strowger.log" &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
wait_answering "$PORT"

python3 -c "
print('SEQUENTIAL')
for i in range(10000): print(f'phone{i}')" > "$WORK/phones.csv"

# One SIPp stream in the background: name, rate, then SIPp's arguments.
stream() {
  local name=$1 rate=$2; shift 2
  local calls=$(( rate * DURATION_S ))
  [ "$calls" -gt 0 ] || return 0
  sipp "$@" -i 127.0.0.1 -p "$(free_port)" -r "$rate" -m "$calls" -l $(( rate * 40 + 50 )) \
    -nostdin -trace_stat -stf "$WORK/$name.csv" -fd 5 -timeout $(( DURATION_S + 120 ))s \
    127.0.0.1:"$PORT" >/dev/null 2>&1 &
  PIDS+=("$!")
  STREAMS+=("$name:$!")
}
STREAMS=()
# The transfer's callee and target answer whatever comes.
sipp -sf "$SC/uas_refer.xml" -i 127.0.0.1 -p "$XB" -nostdin -key target "sip:target@127.0.0.1:$XC" \
  -bg >/dev/null 2>&1 || true
PIDS+=("$(pgrep -f "sipp -sf $SC/uas_refer.xml -i 127.0.0.1 -p $XB" | head -1)")
sipp -sf "$SC/uas_target.xml" -i 127.0.0.1 -p "$XC" -nostdin -bg >/dev/null 2>&1 || true
PIDS+=("$(pgrep -f "sipp -sf $SC/uas_target.xml -i 127.0.0.1 -p $XC" | head -1)")

fds() { ls "/proc/$SERVER_PID/fd" 2>/dev/null | wc -l; }
metric() { curl -s "http://127.0.0.1:$HTTP/metrics" | awk -v m="$1" '$1==m{print $2+0}'; }
FD0=$(fds)
T0=$(date +%s)
stream calls "$CALL_RATE" -sn uac -s service
stream registers "$REG_RATE" -sf "$ROOT/benches/soak/register.xml" -inf "$WORK/phones.csv"
stream publish "$PRES_RATE" -sf "$SC/pres_publish.xml" -s desk
stream watch "$PRES_RATE" -sf "$SC/pres_watch.xml" -s desk
stream transfers "$XFER_RATE" -sf "$SC/uac_reinvited.xml" -s xfer

echo "# soak: ${DURATION_S}s, calls $CALL_RATE/s, registers $REG_RATE/s, presence $PRES_RATE/s x2, transfers $XFER_RATE/s"
echo "# t_s rss_mib fds calls_active cpu_pct"
WARM_RSS=0
WARM_S=$(( DURATION_S * WARM_PCT / 100 ))
[ "$WARM_S" -ge 60 ] || WARM_S=60
LAST_TICKS=$(cpu_ticks "$SERVER_PID")
while :; do
  sleep "$SAMPLE_S"
  kill -0 "$SERVER_PID" 2>/dev/null || { echo "the server died"; exit 1; }
  t=$(( $(date +%s) - T0 ))
  rss=$(rss_kb "$SERVER_PID")
  ticks=$(cpu_ticks "$SERVER_PID")
  cpu=$(( (ticks - LAST_TICKS) * 100 / HZ / SAMPLE_S ))
  LAST_TICKS=$ticks
  echo "$t $(( rss / 1024 )) $(fds) $(metric strowger_calls_active) $cpu"
  if [ "$WARM_RSS" = 0 ] && [ "$t" -ge "$WARM_S" ]; then WARM_RSS=$rss; fi
  [ "$t" -ge "$DURATION_S" ] && break
done
END_RSS=$(rss_kb "$SERVER_PID")
# The streams end once their calls are placed; the last calls and transactions finish.
for s in "${STREAMS[@]}"; do
  pid=${s#*:}
  for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
  kill "$pid" 2>/dev/null || true
done
for _ in $(seq 1 60); do [ "$(metric strowger_calls_active)" = 0 ] && break; sleep 1; done
sleep 35 # transactions linger 32 s after their end (RFC 6026 Timer L/M, Timer J)
FD1=$(fds)
STARTED=$(metric strowger_calls_total)
RECORDS=$(wc -l < "$WORK/calls.jsonl")
FAIL=0
echo "# stream offered completed failed"
for s in "${STREAMS[@]}"; do
  name=${s%%:*}
  ok=$(stat_col "$WORK/$name.csv" 'SuccessfulCall(C)')
  bad=$(stat_col "$WORK/$name.csv" 'FailedCall(C)')
  echo "$name $(stat_col "$WORK/$name.csv" 'OutgoingCall(C)') $ok $bad"
  if [ $(( bad * 1000 )) -gt $(( (ok + bad) )) ]; then FAIL=1; echo "  more than 0.1% failed"; fi
done
growth=$(python3 -c "print(round(100*($END_RSS-$WARM_RSS)/max($WARM_RSS,1),1))")
echo "RSS after warm-up $(( WARM_RSS / 1024 )) MiB, at the end $(( END_RSS / 1024 )) MiB: ${growth}% (bound ${RSS_BOUND_PCT}%)"
python3 -c "import sys; sys.exit(0 if $growth <= $RSS_BOUND_PCT else 1)" || { FAIL=1; echo "  RSS grew past the bound"; }
echo "descriptors: $FD0 at the start, $FD1 idle at the end"
[ "$FD1" -le $(( FD0 + 5 )) ] || { FAIL=1; echo "  descriptors leaked"; }
echo "calls started $STARTED, call records written $RECORDS"
[ "${STARTED%.*}" = "$RECORDS" ] || { FAIL=1; echo "  call records missing"; }
echo "idle RSS at the end: $(( $(rss_kb "$SERVER_PID") / 1024 )) MiB"
exit $FAIL
