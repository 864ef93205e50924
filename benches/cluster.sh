#!/usr/bin/env bash
# What the cluster costs (issue 18 item 6): CPU per call and Redis commands per call of one
# node with `[cluster] enabled = true` (registrations, presence, agents, established-call
# records and the liveness lease in Redis) against the same node on its embedded store.
# SIPp's built-in uac calls through the node to SIPp's built-in uas (the bench dial plan of
# benches/calls.sh); the two set-ups alternate ROUNDS times on fresh processes, CALLS calls
# at RATE per second each.
#
# Printed per round and set-up: server CPU µs per call (utime+stime of the node), Redis
# server CPU µs per call, Redis commands per call (INFO's total_commands_processed, idle
# commands of the same span subtracted: lease renewals and the nodes' watch), and the
# ratios cluster / embedded of the means.
#
# Usage: bash benches/cluster.sh      (CALLS=5000 RATE=500 ROUNDS=2)
#        NO_BUILD=1 skips `cargo build --release`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CALLS=${CALLS:-5000}
RATE=${RATE:-500}
ROUNDS=${ROUNDS:-2}
SKIP_KAMAILIO=1

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
command -v redis-server >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
}
bench_start cluster

REDIS_PORT=$(free_tcp_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis_commands() { redis-cli -p "$REDIS_PORT" info stats | awk -F: '/^total_commands_processed/{print $2+0}'; }

run() { # mode -> prints "node_us redis_us commands_per_call ok failed"
  local mode=$1 port t0 t1 r0 r1 c0 c1 ci0 ci1 ok failed span idle
  port=$(free_port)
  if [ "$mode" = cluster ]; then
    BENCH_EXTRA_TOML=$(printf '[redis]\nurl = "redis://127.0.0.1:%s/"\n[cluster]\nenabled = true\nnode = "bench"\n' "$REDIS_PORT")
  else
    BENCH_EXTRA_TOML=$(printf '[storage]\ndir = "%s/data-%s"\n' "$WORK" "$RANDOM")
  fi
  export BENCH_EXTRA_TOML
  start_strowger "$port"
  run_uac "$port" 500 250 >/dev/null   # warm-up
  sleep 1
  # Idle commands (lease renewals, the watch) over 5 s, to subtract per second.
  ci0=$(redis_commands); sleep 5; ci1=$(redis_commands)
  t0=$(cpu_ticks "$SERVER_PID"); r0=$(cpu_ticks "$REDIS_PID"); c0=$(redis_commands)
  local start=$SECONDS
  read -r ok failed _ < <(run_uac "$port" "$CALLS" "$RATE")
  span=$((SECONDS - start))
  t1=$(cpu_ticks "$SERVER_PID"); r1=$(cpu_ticks "$REDIS_PID"); c1=$(redis_commands)
  kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
  idle=$(python3 -c "print(($ci1-$ci0)/5*$span)")
  python3 -c "ok=max($ok,1); print(round(($t1-$t0)*1e6/$HZ/ok,1), round(($r1-$r0)*1e6/$HZ/ok,1), round(max(0,$c1-$c0-$idle)/ok,2), $ok, $failed)"
}

declare -a EMB CLU
for round in $(seq 1 "$ROUNDS"); do
  for mode in embedded cluster; do
    read -r node redis cmds ok failed < <(run "$mode")
    echo "round $round $mode: node $node us/call, redis $redis us/call, $cmds Redis commands/call ($ok ok, $failed failed)"
    if [ "$mode" = embedded ]; then EMB+=("$node $redis $cmds"); else CLU+=("$node $redis $cmds"); fi
  done
done
python3 - "${EMB[@]}" -- "${CLU[@]}" <<'PY'
import sys
args = sys.argv[1:]
i = args.index("--")
emb = [list(map(float, a.split())) for a in args[:i]]
clu = [list(map(float, a.split())) for a in args[i + 1:]]
mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)
e, c = mean(emb, 0), mean(clu, 0)
print(f"embedded: node {e:.0f} us/call; cluster: node {c:.0f} us/call + redis {mean(clu, 1):.0f} us/call, "
      f"{mean(clu, 2):.2f} Redis commands/call")
print(f"node CPU cluster/embedded: {c / e:.2f}x; node+redis / embedded: {(c + mean(clu, 1)) / e:.2f}x")
PY
