#!/usr/bin/env bash
# Overload run (issue 15): SIPp's built-in uac offers Strowger 1x, 2x and 3x a base rate
# (its highest sustained rate from benches/calls.sh on this machine) for STEP_S seconds
# each, through to SIPp's built-in uas. Per step: calls completed per second (and as a
# share of the base rate), new calls refused with 503 (strowger_overload_refused_total),
# SIPp's retransmissions, and the set-up latency of the completed calls (INVITE sent ->
# 200 received, SIPp's -trace_rtt), median and 99th percentile, and the server's CPU
# (its share of one core over the offered seconds) and CPU per completed call, refusals
# included. A fresh server per step. As the last step's flood ends, the same server is
# offered the base rate for STEP_S seconds (RECOVERY=0: not): its completed calls per
# second show how soon it is back to normal. With BASE=auto the base is offered once
# more at the end, as it was found (AGAIN=0: not): whether the machine still carries it.
#
# Usage: bash benches/overload.sh            (BASE=4000 STEP_S=10)
#        BASE=2000 STEP_S=5 NO_BUILD=1 bash benches/overload.sh   (quick look)
#        BENCH_EXTRA_TOML='[call]
#        overload_delay_ms = 0' bash benches/overload.sh   (without the overload control)
#        PERF_STEP=3 ...: perf record of the server during the 3x step; MULTS="3": that step only;
#        PERF_ARGS="--call-graph dwarf,16384 -F 1000" for call graphs through Rust code
#        (the release build keeps no frame pointers; default -g)
#        WATCH=1 ...: the detector's metrics (refused share, each queue's smallest delay)
#        every 200 ms of each step, in the file printed
#        QUOTA=50 BASE=auto bash benches/overload.sh   (the base found first, in the
#        same run: 1x steps from AUTO_FROM (4000) by AUTO_STEP (500), up to AUTO_TO
#        (20000), while 99.9% of the calls complete, then AUTO_REFINE (2) halvings of
#        the step that failed; then 1x, 2x and 3x of it. Those 1x steps run without the
#        overload control, so that the base is what the server carries, not lowered by
#        its own refusals; AUTO_UNCONTROLLED=0: with it)
#        QUOTA=50 BASE=1500 bash benches/overload.sh   (the server held to 50% of one
#        core by a cgroup-v1 CPU quota, so that SIPp can offer 3x what the server
#        carries; BASE is then what the server carries so held. With a quota the server
#        is pinned to CPU 0 and SIPp to CPU 1 (PIN=0: not), as where the phones are not
#        on the server's cores: unpinned, SIPp offering 3x may also run on the server's
#        core between its quota slices)
#        PIN=1 BASE=2500 bash benches/overload.sh   (the server on CPU 0, SIPp on CPU 1:
#        SIPp at 2-3x no longer takes the server's core; BASE is then the rate one core
#        carries)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
source benches/lib.sh
SKIP_KAMAILIO=1
BASE=${BASE:-4000}
[ -n "${QUOTA:-}" ] && PIN=${PIN:-1}
SIPP=(sipp)
if [ "${PIN:-0}" = 1 ]; then
  WRAP=(taskset -c 0)
  SIPP=(taskset -c 1 sipp)
  # SIPp's uas, started by bench_start, moves to CPU 1 below.
fi
STEP_S=${STEP_S:-10}
bench_start overload
CGROUP=""
if [ -n "${QUOTA:-}" ]; then
  CGROUP=/sys/fs/cgroup/cpu/strowger-overload-$$
  if mkdir "$CGROUP" 2>/dev/null && echo 10000 >"$CGROUP/cpu.cfs_period_us" &&
    echo $((QUOTA * 100)) >"$CGROUP/cpu.cfs_quota_us"; then
    trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rmdir "$CGROUP" 2>/dev/null || true' EXIT
    echo "server held to ${QUOTA}% of one core ($CGROUP)" >&2
  else
    echo "QUOTA: cannot make a cgroup-v1 CPU group here; not applied" >&2
    CGROUP=""
  fi
fi
[ "${PIN:-0}" = 1 ] && taskset -pc 1 "$UAS_PID" >/dev/null

refused_total() {
  curl -s "127.0.0.1:$HTTP_PORT/metrics" | awk '/^strowger_overload_refused_total/{print $2+0}' || echo 0
}

# Goodput: calls SIPp completed within the offered window plus 5 s (read from its
# statistics file, written every second), per second offered. SIPp is stopped then:
# what was not done by then does not count, however it would have ended.
# One step: `rate` calls/s offered to a fresh server (`mult`: the multiple of the base it
# is, for PERF_STEP); prints its line, sets STEP_OK (the step's goodput per second).
step() {
  local rate=$1 mult=$2 cpu_before cpu
  port=$(free_port)
  start_strowger "$port"
  if [ -n "$CGROUP" ]; then
    for t in /proc/"$SERVER_PID"/task/*; do echo "${t##*/}" >"$CGROUP/tasks"; done
  fi
  before=$(refused_total)
  cpu_before=$(cpu_ticks "$SERVER_PID")
  uac_port=$(free_port)
  stf="$WORK/overload-$rate.csv"
  mkdir -p "$WORK/rtt-$rate"
  (cd "$WORK/rtt-$rate" && "${SIPP[@]}" -sn uac -s service -i 127.0.0.1 -p "$uac_port" \
    "${SIPP_BUF[@]}" -m $((rate * STEP_S)) -r "$rate" -l $((rate * 4 + 100)) -nostdin -trace_stat -stf "$stf" \
    -fd 1 -trace_rtt -rtt_freq 100 -bg 127.0.0.1:"$port" >/dev/null 2>&1) || true
  sleep 1
  uac_pid=$(pgrep -f "sipp -sn uac -s service -i 127.0.0.1 -p $uac_port" | head -1 || true)
  [ -n "$uac_pid" ] && PIDS+=("$uac_pid")
  if [ "${WATCH:-0}" = 1 ]; then
    # What the detector saw, every 200 ms: refused share and each queue's smallest delay.
    (while kill -0 "$SERVER_PID" 2>/dev/null; do
      curl -s "127.0.0.1:$HTTP_PORT/metrics" |
        awk -v t="$(date +%s.%N)" '/^strowger_overload_(refused_ratio|queue_delay_seconds|refused_total)/{l=l" "$0} END{print t l}'
      sleep 0.2
    done >"$WORK/watch-$rate.log" 2>/dev/null) &
    echo "watch: $WORK/watch-$rate.log" >&2
  fi
  rec_pid=""
  if [ "${RECOVERY:-1}" = 1 ] && [ "$mult" = "${LAST_MULT:-}" ] && [ "${PERF_STEP:-0}" != "$mult" ]; then
    # Recovery (issue 15: "recovers to normal within seconds after the flood"): as the
    # flood's offered window ends, the same server is offered the base rate for STEP_S
    # seconds; its completed calls per second show how soon it is back.
    sleep $((STEP_S - 1))
    # The flood's CPU ends here (its calls in flight take a few tens of ms more).
    cpu_flood=$(( $(cpu_ticks "$SERVER_PID") - cpu_before ))
    rec_before=$(refused_total)
    rec_port=$(free_port)
    rec_stf="$WORK/recovery-$rate.csv"
    "${SIPP[@]}" -sn uac -s service -i 127.0.0.1 -p "$rec_port" "${SIPP_BUF[@]}" \
      -m $((BASE * STEP_S)) -r "$BASE" -l $((BASE * 4 + 100)) -nostdin -trace_stat \
      -stf "$rec_stf" -fd 1 -bg 127.0.0.1:"$port" >/dev/null 2>&1 || true
    rec_pid=$(pgrep -f "sipp -sn uac -s service -i 127.0.0.1 -p $rec_port" | head -1 || true)
    if [ -n "$rec_pid" ]; then PIDS+=("$rec_pid"); else echo "recovery: SIPp did not start" >&2; fi
    sleep 5
  elif [ "${PERF_STEP:-0}" = "$mult" ]; then
    # Where the server's time goes at this step (perf report -i the file printed).
    # shellcheck disable=SC2086 # PERF_ARGS is a list of options
    perf record ${PERF_ARGS:--g} -o "$WORK/perf-$rate.data" -p "$SERVER_PID" -- sleep $((STEP_S - 2)) \
      >/dev/null 2>&1 || true
    echo "perf: $WORK/perf-$rate.data" >&2
    sleep 6
  else
    sleep $((STEP_S + 4))
  fi
  ok=$(stat_col "$stf" 'SuccessfulCall(C)')
  retrans=$(stat_col "$stf" 'Retransmissions(C)')
  shed=$(( $(refused_total) - before ))
  [ -n "$rec_pid" ] && shed=$((rec_before - before))
  cpu=$(( $(cpu_ticks "$SERVER_PID") - cpu_before ))
  [ -n "$rec_pid" ] && cpu=$cpu_flood
  [ -n "$uac_pid" ] && kill -USR1 "$uac_pid" 2>/dev/null || true # SIPp flushes its files
  sleep 1
  [ -n "$uac_pid" ] && kill "$uac_pid" 2>/dev/null || true
  sleep 1
  if [ -n "$rec_pid" ]; then
    sleep $((STEP_S))
    kill -USR1 "$rec_pid" 2>/dev/null || true
    sleep 1
    kill "$rec_pid" 2>/dev/null || true
    # Per second of the recovery flow: calls completed (SIPp's periodic count).
    per_s=$(awk -F';' 'NR==1{for(i=1;i<=NF;i++) if($i=="SuccessfulCall(P)") c=i; next} {printf "%s%d", (n++ ? " " : ""), $c}' "$rec_stf")
    echo "after the flood, ${BASE}/s on the same server: $(( $(refused_total) - rec_before )) refused; completed per second: $per_s" >&2
  fi
  python3 -c "
import glob
ok, rate, base, win, shed, retrans = $ok, $rate, ($BASE or $rate), $STEP_S + 5, $shed, $retrans
cpu = $cpu / $(getconf CLK_TCK)
rtts = []
for f in glob.glob('$WORK/rtt-$rate/*_rtt.csv'):
    for line in open(f).read().splitlines()[1:]:
        parts = line.split(';')
        if len(parts) >= 2:
            try: rtts.append(float(parts[1]))
            except ValueError: pass
rtts.sort()
q = lambda p: rtts[min(len(rtts) - 1, int(p * len(rtts)))] if rtts else float('nan')
print(f'{rate:<8} {ok / (win - 5):>12.0f} {ok / (win - 5) / base:>9.0%} {shed:>9} {retrans:>9} {q(0.5):>9.1f} {q(0.99):>9.1f} {cpu / (win - 5):>8.0%} {cpu * 1e6 / max(ok, 1):>9.0f}')"
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  sleep 1
  STEP_OK=$((ok / STEP_S))
}

if [ "$BASE" = auto ]; then
  # The base found in the same run: the machine's speed moves by half within an hour,
  # so a base measured earlier says little. Rates from AUTO_FROM up in AUTO_STEP steps
  # at 1x, then halves of the step that failed (below); the base is the highest that
  # completed 99.9% of its calls (under 0.1% refused or failed, issue 14's
  # "sustained"); its 2x and 3x follow at once.
  r=${AUTO_FROM:-4000} BASE=0 found=0
  echo "finding the base (1x steps from $r by ${AUTO_STEP:-500}):" >&2
  # The 1x steps run without the overload control (AUTO_UNCONTROLLED=0: with it), so
  # that the base is what the server itself carries, not lowered by its own refusals.
  extra=${BENCH_EXTRA_TOML:-}
  if [ "${AUTO_UNCONTROLLED:-1}" = 1 ]; then
    echo "(the 1x steps without the overload control)" >&2
    BENCH_EXTRA_TOML="$extra
[call]
overload_delay_ms = 0"
  fi
  held() { [ $((STEP_OK * 1000)) -ge $(($1 * 999)) ]; }
  topped=0
  while [ "$r" -le "${AUTO_TO:-20000}" ]; do
    step "$r" ramp >&2
    held "$r" || { topped=1; break; }
    found=$r r=$((r + ${AUTO_STEP:-500}))
  done
  # Then halves of the step that failed (AUTO_REFINE (2) of them: to 125/s
  # with the 500/s step). With whole steps only, the base fell anywhere up to a step
  # (a sixth of it at 3,000/s) below what the server carries, and the 3x step's share
  # of it moved with where in that step the server's rate lay.
  half=$(( ${AUTO_STEP:-500} / 2 ))
  for _ in $(seq 1 "${AUTO_REFINE:-2}"); do
    [ "$topped" = 1 ] && [ "$found" -gt 0 ] && [ "$half" -ge 1 ] || break
    r=$((found + half))
    step "$r" ramp >&2
    if held "$r"; then found=$r; fi
    half=$((half / 2))
  done
  BASE=$found AUTO_FOUND=1 AUTO_TOML=$BENCH_EXTRA_TOML
  BENCH_EXTRA_TOML=$extra
  [ "$BASE" -gt 0 ] || { echo "not even ${AUTO_FROM:-4000}/s is sustained" >&2; exit 1; }
  echo "base: $BASE/s" >&2
fi
printf '%-8s %12s %9s %9s %9s %9s %9s %8s %9s\n' offered "completed/s" "of base" "503s" "retrans" "p50 ms" "p99 ms" "CPU" "µs/call"
LAST_MULT=$(echo ${MULTS:-1 2 3} | awk '{print $NF}')
for mult in ${MULTS:-1 2 3}; do
  step $((BASE * mult)) "$mult"
done
if [ "${AUTO_FOUND:-0}" = 1 ] && [ "${AGAIN:-1}" = 1 ]; then
  # The base again, as it was found (fresh server, same control setting): the machine's
  # speed moves within minutes, and a base that no longer holds after the flood says
  # the machine slowed during the run, not the server under it.
  BENCH_EXTRA_TOML=$AUTO_TOML
  echo "the base again, as found:" >&2
  step "$BASE" again >&2
fi
