#!/usr/bin/env bash
# REGISTER benchmark: SIPp phones registering with MD5 digest authentication (REGISTER,
# 401, REGISTER with credentials, 200) against the server on loopback, with USERS
# bindings stored, for the embedded store (SQLite) and then for Redis. For each backend:
#   1. a fresh server with a users file of USERS users and a fresh store;
#   2. one REGISTER per user at PRELOAD_RATE (USERS bindings), checked on GET /registrations;
#   3. server CPU (utime+stime from /proc) per REGISTER over MEASURE refreshes at RATE/s,
#      then the highest sustained rate: steps of STEP_S seconds at the RATES rates;
#      sustained = under 0.1% failed or unfinished and every REGISTER done within
#      STEP_S + GRACE_S seconds (a step that misses is tried once more, the machine is shared);
#   4. resident memory per binding: RSS of the fresh server before the preload and
#      MEM_WAIT_S seconds after it (the REGISTER transactions linger 64*T1 = 32 s), over USERS.
# A "REGISTER" here is one completed authenticated registration: one SIPp scenario run, two
# transactions (401 and 200). For Redis, redis-server's own CPU and memory are shown apart.
#
# Usage: bash benches/register.sh
#        USERS=20000 RATES="2000 4000 6000" SKIP_REDIS=1 bash benches/register.sh  (quick look)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
USERS=${USERS:-100000}
PRELOAD_RATE=${PRELOAD_RATE:-4000}
MEASURE=${MEASURE:-20000}
RATE=${RATE:-2000}
RATES=${RATES:-"2000 3000 4000 5000 6000 8000 10000 12000 15000"}
STEP_S=${STEP_S:-5}
GRACE_S=${GRACE_S:-3}
MEM_WAIT_S=${MEM_WAIT_S:-40}
SKIP_REDIS=${SKIP_REDIS:-0}
BACKENDS=${BACKENDS:-embedded redis}
[ "$SKIP_REDIS" = 1 ] && BACKENDS=${BACKENDS//redis/}
DOMAIN=strowger.test

need=()
command -v sipp >/dev/null || need+=(sip-tester)
if [[ " $BACKENDS " == *" redis "* ]]; then
  command -v redis-server >/dev/null || need+=(redis-server)
  command -v redis-cli >/dev/null || need+=(redis-tools)
fi
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet

WORK=$(mktemp -d /tmp/strowger-regbench.XXXXXX)
echo "work directory: $WORK" >&2
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

python3 "$ROOT/benches/register/gen_users.py" "$USERS" "$DOMAIN" "$WORK"

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
stop() { # pid: TERM, then KILL after 15 s
  kill "$1" 2>/dev/null || return 0
  for _ in $(seq 1 150); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}
bindings() {
  curl -s --max-time 30 "http://127.0.0.1:$HTTP_PORT/registrations" |
    python3 -c 'import json,sys;print(len(json.load(sys.stdin)))' 2>/dev/null || echo 0
}

start_redis() {
  REDIS_PORT=$(free_tcp_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$WORK" --logfile "$WORK/redis.log" --daemonize no &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  for _ in $(seq 1 100); do
    [ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ] && return 0
    sleep 0.1
  done
  echo "redis-server does not answer" >&2; return 1
}

start_server() { # backend
  SIP_PORT=$(free_port)
  HTTP_PORT=$(free_tcp_port)
  rm -rf "$WORK/data-$1"
  # max_failures: every phone comes from 127.0.0.1, and the default (5 within a minute)
  # would turn any stray failure into 403 for all of them.
  cat > "$WORK/strowger-$1.toml" <<TOML
[sip]
listen = ["udp:127.0.0.1:$SIP_PORT"]
domain = "$DOMAIN"
[http]
listen = "127.0.0.1:$HTTP_PORT"
[log]
level = "warn"
[registrar]
users_file = "$WORK/users.toml"
store = "$1"
min_expires = 60
max_expires = 3600
[storage]
dir = "$WORK/data-$1"
[redis]
url = "redis://127.0.0.1:${REDIS_PORT:-6379}/"
[auth]
algorithms = ["MD5"]
max_failures = 1000000
[shutdown]
drain_timeout_s = 1
TOML
  "$ROOT/target/release/strowger" run --config "$WORK/strowger-$1.toml" \
    2>"$WORK/strowger-$1.log" &
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  wait_answering "$SIP_PORT" || { tail -20 "$WORK/strowger-$1.log" >&2; return 1; }
}

# SIPp registering `calls` users (next ones of the injection file, from the first) at
# `rate` per second with at most `limit` in progress; prints
# "successful failed elapsed_s sipp_cpu_s".
run_reg() {
  local calls=$1 rate=$2 limit=$3 stf tmo times
  stf="$WORK/stat-$BACKEND-$rate-$calls-$RANDOM.csv"
  tmo=$(( calls / rate + 30 ))
  local TIMEFORMAT='%R %U %S'
  times=$( { time timeout $((tmo + 15)) sipp -sf "$ROOT/benches/register/register.xml" \
      -inf "$WORK/users.csv" -i 127.0.0.1 -p "$UAC_PORT" -m "$calls" -r "$rate" -l "$limit" \
      -nostdin -nd -timeout "${tmo}s" -trace_stat -stf "$stf" -fd 1 -trace_err \
      -error_file "$WORK/sipp-err-$BACKEND.log" \
      127.0.0.1:"$SIP_PORT" >/dev/null 2>&1; } 2>&1 ) || true
  times=$(echo "$times" | tail -1)
  if [ -s "$stf" ]; then
    echo "$(stat_col "$stf" 'SuccessfulCall(C)') $(stat_col "$stf" 'FailedCall(C)')" \
      "$(echo "$times" | awk '{printf "%.1f %.1f", $1, $2+$3}')"
  else
    echo "0 0 $(echo "$times" | awk '{printf "%.1f %.1f", $1, $2+$3}')"
  fi
}

bench_backend() { # backend -> one line "backend cps cpu_us mem_b bindings redis_cpu_us redis_mem_b"
  BACKEND=$1
  REDIS_PID="" REDIS_PORT=""
  [ "$BACKEND" = redis ] && start_redis
  start_server "$BACKEND"
  UAC_PORT=$(free_port)
  sleep 2
  local base rbase=0 after rafter=0 ok failed el scpu n
  base=$(rss_kb "$SERVER_PID")
  [ -n "$REDIS_PID" ] && rbase=$(rss_kb "$REDIS_PID")

  # 2. Preload: one registration per user.
  read -r ok failed el scpu < <(run_reg "$USERS" "$PRELOAD_RATE" $((PRELOAD_RATE * 2)))
  echo "$BACKEND: preload $ok ok, $failed failed in ${el}s at $PRELOAD_RATE/s (SIPp CPU ${scpu}s)" >&2
  # 4. Memory, once the preload's transactions have ended.
  sleep "$MEM_WAIT_S"
  after=$(rss_kb "$SERVER_PID")
  [ -n "$REDIS_PID" ] && rafter=$(rss_kb "$REDIS_PID")
  n=$(bindings)
  echo "$BACKEND: $n bindings; server RSS $base kB before, $after kB after" \
    "${REDIS_PID:+(redis-server $rbase kB before, $rafter kB after)}" >&2
  MEM_B=$(python3 -c "print(round(($after-$base)*1024/max($n,1)))")
  R_MEM_B=$(python3 -c "print(round(($rafter-$rbase)*1024/max($n,1)))")

  # 3a. CPU per REGISTER.
  local t0 t1 r0=0 r1=0
  t0=$(cpu_ticks "$SERVER_PID"); [ -n "$REDIS_PID" ] && r0=$(cpu_ticks "$REDIS_PID")
  read -r ok failed el scpu < <(run_reg "$MEASURE" "$RATE" $((RATE * 2)))
  t1=$(cpu_ticks "$SERVER_PID"); [ -n "$REDIS_PID" ] && r1=$(cpu_ticks "$REDIS_PID")
  CPU_US=$(python3 -c "print(round(($t1-$t0)*1e6/$HZ/max($ok,1),1))")
  R_CPU_US=$(python3 -c "print(round(($r1-$r0)*1e6/$HZ/max($ok,1),1))")
  echo "$BACKEND: $ok ok, $failed failed at $RATE/s in ${el}s; server CPU $CPU_US us/REGISTER" \
    "${REDIS_PID:+(redis-server $R_CPU_US us)} (SIPp CPU ${scpu}s)" >&2

  # 3b. Highest sustained rate.
  MAX_RATE=0
  local r calls try pass
  for r in $RATES; do
    calls=$((r * STEP_S))
    pass=0
    for try in 1 2; do
      sleep 2
      read -r ok failed el scpu < <(run_reg "$calls" "$r" $((r * 2)))
      if python3 -c "import sys; sys.exit(0 if $ok*1000 >= $calls*999 and $failed*1000 < $calls and $el <= $STEP_S + $GRACE_S else 1)"; then
        pass=1
      fi
      echo "$BACKEND: $r/s try $try: $ok ok, $failed failed of $calls in ${el}s (SIPp CPU ${scpu}s)" \
        "$([ $pass = 1 ] && echo sustained || echo 'not sustained')" >&2
      [ $pass = 1 ] && break
    done
    [ $pass = 1 ] || break
    MAX_RATE=$r
  done
  n=$(bindings)
  echo "$BACKEND: $n bindings at the end" >&2
  stop "$SERVER_PID"
  [ -n "$REDIS_PID" ] && stop "$REDIS_PID"
  RESULTS+=("$BACKEND $MAX_RATE $CPU_US $MEM_B $n $R_CPU_US $R_MEM_B")
}

RESULTS=()
for b in $BACKENDS; do bench_backend "$b"; done

echo "REGISTER benchmark: $USERS users/bindings, MD5 digest, UDP loopback; CPU over $MEASURE" \
  "REGISTERs at $RATE/s; rate steps of ${STEP_S}s ($RATES)"
printf '%-9s %12s %14s %12s %10s %22s\n' backend "REGISTER/s" "CPU us/REG" "B/binding" bindings \
  "redis-server us, B"
for line in "${RESULTS[@]}"; do
  read -r b cps cpu mem n rcpu rmem <<<"$line"
  extra="-"
  [ "$b" = redis ] && extra="$rcpu us, $rmem B"
  printf '%-9s %12s %14s %12s %10s %22s\n' "$b" "$cps" "$cpu" "$mem" "$n" "$extra"
done
