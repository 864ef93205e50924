#!/usr/bin/env bash
# Per-call cost in figures that load from other processes on the machine does not move
# (much): for Strowger and Kamailio (benches/kamailio/, the comparator of calls.sh), SIPp's
# built-in uac -> server -> SIPp's built-in uas on loopback.
#
# 1. Instructions per call: the server (all its processes) under `valgrind --tool=callgrind`;
#    after a warm-up and SETTLE_S seconds (the warm-up's transactions end: 64*T1 = 32 s),
#    counters are zeroed, IDLE_S seconds idle are dumped; zeroed again, CG_CALLS calls at
#    CG_RATE run, SETTLE_S more seconds pass (so the timers that end each call's
#    transactions are counted too), dumped. Per call: (calls - idle scaled to the same
#    length) / completed calls.
# 2. On the server run natively, the same warm-up / idle / calls+settle windows with CALLS
#    calls at RATE: system calls, context switches and page faults (perf stat on every
#    thread, exited ones included), context switches of the live threads
#    (/proc/<pid>/task/*/status), user and system CPU (/proc/<pid>/stat), each minus the
#    idle window, per completed call.
#    Without perf, system calls come from a third run under `strace -c -f`.
#
# Usage: bash benches/callgrind.sh
#          (SERVERS="strowger kamailio" CG_CALLS=300 CG_RATE=10 CALLS=3000 RATE=300
#           SETTLE_S=40 IDLE_S=20 KAM_CHILDREN=4)
#        SERVERS=strowger CG_CALLS=100 bash benches/callgrind.sh   (quick look)
#        NO_BUILD=1 skips `cargo build --release`; NO_CALLGRIND=1 measures only part 2
#        (instructions are then reported as 0).
#        PROFILE=40: also where the call window's instructions went, per call, the 40
#        functions with most of their own and with their callees (benches/cgprofile.py),
#        written to $WORK/profile-<server>.txt (the path is printed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SERVERS=${SERVERS:-"strowger kamailio"}
CG_CALLS=${CG_CALLS:-300}
CG_RATE=${CG_RATE:-10}
CALLS=${CALLS:-3000}
RATE=${RATE:-300}
SETTLE_S=${SETTLE_S:-40}
IDLE_S=${IDLE_S:-20}
WARM_CALLS=${WARM_CALLS:-50}

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
need=(sipp valgrind perf)
[[ " $SERVERS " == *" kamailio "* ]] && need+=(kamailio)
need_packages "${need[@]}"
[ "${NO_BUILD:-0}" = 1 ] || cargo build --release --quiet
bench_setup callgrind
WRAP=()

now() { date +%s.%N; }
calc() { python3 -c "print($1)"; }
# Sum of the instruction totals callgrind dumped into $WORK/cg since the last call; the
# dumps are moved to $WORK/cg/<phase>/.
take_dumps() {
  local phase=$1 f total=0 n
  mkdir -p "$WORK/cg/$phase"
  for f in "$WORK"/cg/*.*; do
    [ -f "$f" ] || continue
    n=$(awk '/^(summary|totals):/{print $2; exit}' "$f")
    total=$((total + ${n:-0}))
    mv "$f" "$WORK/cg/$phase/"
  done
  echo "$total"
}
cg_control() { # option -> runs callgrind_control on every process of the server
  # shellcheck disable=SC2046
  timeout 60 callgrind_control "$1" $(all_pids "$SERVER_PID") >/dev/null 2>&1
}
# Waits (bounded) until a dump of each process of the server is written.
wait_dumps() {
  local want i have
  want=$(all_pids "$SERVER_PID" | wc -w)
  for i in $(seq 1 300); do
    have=$(find "$WORK/cg" -maxdepth 1 -name '*.*' -type f | wc -l)
    [ "$have" -ge "$want" ] && { sleep 1; return 0; }
    sleep 0.2
  done
  echo "callgrind dumps missing ($have of $want)" >&2
}
stop_server() {
  kill "$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 1 150); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
  kill -9 "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
}

instructions() { # server -> sets INSTR (per call) and CG_NOTE
  local name=$1 port ok failed retrans t0 t1 t2 t3 idle busy
  port=$(free_port)
  mkdir -p "$WORK/cg"
  WRAP=(valgrind -q --tool=callgrind --trace-children=yes
        --callgrind-out-file="$WORK/cg/%p")
  "start_$name" "$port"
  WRAP=()
  run_uac "$port" "$WARM_CALLS" "$CG_RATE" >/dev/null
  sleep "$SETTLE_S"
  cg_control -d; wait_dumps; take_dumps warm >/dev/null
  t0=$(now); cg_control -z
  sleep "$IDLE_S"
  cg_control -d; t1=$(now); wait_dumps
  idle=$(take_dumps idle)
  t2=$(now); cg_control -z
  read -r ok failed retrans < <(run_uac "$port" "$CG_CALLS" "$CG_RATE")
  sleep "$SETTLE_S"
  cg_control -d; t3=$(now); wait_dumps
  busy=$(take_dumps calls)
  stop_server
  if [ -n "${PROFILE:-}" ]; then
    python3 "$ROOT/benches/cgprofile.py" "$ok" "$PROFILE" "$WORK"/cg/calls/* \
      >"$WORK/profile-$name.txt"
    echo "$name profile of the call window: $WORK/profile-$name.txt" >&2
  fi
  INSTR=$(calc "round(($busy - $idle * ($t3-$t2)/($t1-$t0)) / max($ok, 1))")
  CG_NOTE="$ok ok, $failed failed, $retrans retransmitted (SIPp)"
  echo "$name callgrind: $busy instructions in $(calc "round($t3-$t2,1)") s with $ok calls" \
    "($failed failed, $retrans SIPp retransmissions), $idle in $(calc "round($t1-$t0,1)") s idle:" \
    "$INSTR per call" >&2
}

# perf stat over every thread of the server until it gets SIGINT; its output in $1.
perf_start() {
  # shellcheck disable=SC2046
  perf stat -x, -o "$1" -e raw_syscalls:sys_enter,context-switches,page-faults \
    -p "$(all_pids "$SERVER_PID" | xargs | tr ' ' ',')" >/dev/null 2>&1 &
  PERF_PID=$!
  PIDS+=("$PERF_PID")
  sleep 0.5
}
perf_stop() {
  kill -INT "$PERF_PID" 2>/dev/null || true
  wait "$PERF_PID" 2>/dev/null || true
}
perf_value() { # file event
  awk -F, -v ev="$2" '$3 ~ ev {print $1+0}' "$1"
}
# utime stime (ticks) of a process and its children.
cpu_split() {
  local u=0 s=0 p a b
  for p in $(all_pids "$1"); do
    read -r a b < <(awk '{print $14, $15}' "/proc/$p/stat" 2>/dev/null || echo "0 0")
    u=$((u + a)); s=$((s + b))
  done
  echo "$u $s"
}

counters() { # server -> sets SYSC CSW VOL INVOL FAULTS USER_US SYS_US (per call)
  local name=$1 port ok failed retrans t0 t1 t2 t3 have_perf=1
  local u0 s0 u1 s1 u2 s2 u3 s3 v0 v1 v2 v3 n0 n1 n2 n3
  perf stat -e raw_syscalls:sys_enter -- true >/dev/null 2>&1 || have_perf=0
  port=$(free_port)
  "start_$name" "$port"
  run_uac "$port" 500 250 >/dev/null
  sleep "$SETTLE_S"
  # Idle window.
  [ $have_perf = 1 ] && perf_start "$WORK/perf-$name-idle.csv"
  t0=$(now); read -r u0 s0 < <(cpu_split "$SERVER_PID"); read -r v0 n0 < <(ctxt_switches "$SERVER_PID")
  sleep "$IDLE_S"
  t1=$(now); read -r u1 s1 < <(cpu_split "$SERVER_PID"); read -r v1 n1 < <(ctxt_switches "$SERVER_PID")
  [ $have_perf = 1 ] && perf_stop
  # Calls, then the settle time in which their transactions end.
  [ $have_perf = 1 ] && perf_start "$WORK/perf-$name-calls.csv"
  t2=$(now); read -r u2 s2 < <(cpu_split "$SERVER_PID"); read -r v2 n2 < <(ctxt_switches "$SERVER_PID")
  read -r ok failed retrans < <(run_uac "$port" "$CALLS" "$RATE")
  sleep "$SETTLE_S"
  t3=$(now); read -r u3 s3 < <(cpu_split "$SERVER_PID"); read -r v3 n3 < <(ctxt_switches "$SERVER_PID")
  [ $have_perf = 1 ] && perf_stop
  stop_server
  local scale
  scale=$(calc "($t3-$t2)/($t1-$t0)")
  per() { calc "round((($2) - ($1) * $scale) / max($ok, 1), ${3:-1})"; }
  USER_US=$(per "($u1-$u0)*1e6/$HZ" "($u3-$u2)*1e6/$HZ")
  SYS_US=$(per "($s1-$s0)*1e6/$HZ" "($s3-$s2)*1e6/$HZ")
  VOL=$(per "$v1-$v0" "$v3-$v2" 2)
  INVOL=$(per "$n1-$n0" "$n3-$n2" 2)
  if [ $have_perf = 1 ]; then
    SYSC=$(per "$(perf_value "$WORK/perf-$name-idle.csv" syscalls)" \
      "$(perf_value "$WORK/perf-$name-calls.csv" syscalls)" 2)
    CSW=$(per "$(perf_value "$WORK/perf-$name-idle.csv" context-switches)" \
      "$(perf_value "$WORK/perf-$name-calls.csv" context-switches)" 2)
    FAULTS=$(per "$(perf_value "$WORK/perf-$name-idle.csv" page-faults)" \
      "$(perf_value "$WORK/perf-$name-calls.csv" page-faults)" 2)
  else
    CSW=$(calc "$VOL+$INVOL")
    FAULTS=-
    SYSC=$(strace_syscalls "$name")
  fi
  echo "$name native: $ok calls ($failed failed, $retrans SIPp retransmissions) in" \
    "$(calc "round($t3-$t2,1)") s: $SYSC syscalls, $CSW context switches (live threads:" \
    "$VOL voluntary, $INVOL involuntary), $FAULTS page faults, $USER_US us user + $SYS_US us" \
    "system CPU per call" >&2
}

# Without perf: system calls per call from a run under strace (which slows the server, so
# only the count is taken from it).
strace_syscalls() {
  local name=$1 port ok out spid
  port=$(free_port)
  "start_$name" "$port"
  run_uac "$port" 500 250 >/dev/null
  sleep "$SETTLE_S"
  out="$WORK/strace-$name.txt"
  # shellcheck disable=SC2046
  strace -c -f -o "$out" $(all_pids "$SERVER_PID" | xargs -n1 echo -p) &
  spid=$!
  PIDS+=("$spid")
  sleep 1
  read -r ok _ < <(run_uac "$port" "$CALLS" "$RATE")
  sleep "$SETTLE_S"
  kill -INT "$spid" 2>/dev/null || true
  wait "$spid" 2>/dev/null || true
  stop_server
  calc "round($(awk '$NF=="total"{print $(NF-1)}' "$out") / max($ok, 1), 2)"
}

ROWS=()
for s in $SERVERS; do
  if [ "${NO_CALLGRIND:-0}" = 1 ]; then INSTR=0; else instructions "$s"; fi
  counters "$s"
  ROWS+=("$s $INSTR $SYSC $CSW $VOL $INVOL $FAULTS $USER_US $SYS_US")
done
printf '%-10s %12s %9s %9s %9s %9s %9s %9s %9s %9s\n' server "instr/call" "syscalls" \
  "ctx sw" "(vol" "invol)" "faults" "user us" "sys us" "u+s us"
for r in "${ROWS[@]}"; do
  read -r n i y c v l f u k <<<"$r"
  printf '%-10s %12s %9s %9s %9s %9s %9s %9s %9s %9s\n' "$n" "$i" "$y" "$c" "$v" "$l" "$f" "$u" "$k" \
    "$(calc "round($u+$k,1)")"
done
echo "(per completed call; callgrind: $CG_CALLS calls at $CG_RATE/s; native: $CALLS calls at $RATE/s;" \
  "idle windows subtracted; Kamailio children: ${KAM_CHILDREN:-4})"
