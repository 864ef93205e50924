# Shell helpers shared by the benchmark scripts (sourced; needs $ROOT).
HZ=$(getconf CLK_TCK)
# SIPp's socket buffers (its default is 64 KiB): at a few thousand calls per second a
# stall of SIPp's own loop overflowed it, and the datagrams the kernel dropped (24,773 in
# one 3x overload step, /proc/net/udp) came back as retransmissions and failed calls
# that the server under test did not cause. As large as Strowger's own UDP buffer; the
# kernel caps both at net.core.rmem_max.
SIPP_BUF=(-buff_size 4194304)

free_port() {
  python3 -c 'import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.bind(("127.0.0.1",0));print(s.getsockname()[1])'
}
free_tcp_port() {
  python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'
}
# A process and its children (Kamailio forks its workers).
all_pids() { echo "$1 $(pgrep -P "$1" | tr '\n' ' ')"; }
# CPU ticks (utime+stime) of a process and its children.
cpu_ticks() {
  local total=0 p
  for p in $(all_pids "$1"); do
    total=$(( total + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0) ))
  done
  echo "$total"
}
# Resident kB of a process and its children.
rss_kb() {
  local total=0 p
  for p in $(all_pids "$1"); do
    total=$(( total + $(awk '/VmRSS/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0) ))
  done
  echo "$total"
}
stat_col() { # SIPp statistics file, column -> value on its last line
  awk -F';' -v col="$2" 'NR==1{for(i=1;i<=NF;i++) if($i==col) c=i} END{print $c+0}' "$1"
}
wait_answering() { # port: until an OPTIONS gets 200 (and while $SERVER_PID lives)
  for _ in $(seq 1 100); do
    if timeout 3 sipp -sf "$ROOT/benches/ping.xml" -m 1 -i 127.0.0.1 -nostdin \
        -timeout 2s 127.0.0.1:"$1" >/dev/null 2>&1; then return 0; fi
    [ -n "${SERVER_PID:-}" ] && { kill -0 "$SERVER_PID" 2>/dev/null || break; }
    sleep 0.2
  done
  echo "server on port $1 does not answer" >&2
  return 1
}

# The start of a bench that compares the servers: SIPp (and Kamailio unless SKIP_KAMAILIO=1)
# installed, the release build (unless NO_BUILD=1), then `bench_setup tag`.
bench_start() {
  if [ "${SKIP_KAMAILIO:-0}" != 1 ]; then need_packages sipp kamailio; else need_packages sipp; fi
  [ "${NO_BUILD:-0}" = 1 ] || cargo build --release --quiet
  bench_setup "$1"
}

# A bench run's scratch dir ($WORK), the PIDs it starts ($PIDS, killed on exit), and
# SIPp's built-in uas answering every call on $UAS_PORT. `tag` names the scratch dir.
bench_setup() {
  WORK=$(mktemp -d "/tmp/strowger-$1.XXXXXX")
  PIDS=()
  trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT
  UAS_PORT=$(free_port)
  sipp -sn uas -i 127.0.0.1 -p "$UAS_PORT" "${SIPP_BUF[@]}" -nostdin -bg >/dev/null 2>&1 || true
  UAS_PID=$(pgrep -f "sipp -sn uas -i 127.0.0.1 -p $UAS_PORT" | head -1)
  PIDS+=("$UAS_PID")
}

# The two servers under test, on `port`, routing every call to SIPp's uas on $UAS_PORT.
# Each sets SERVER_PID and adds it to $PIDS. $WRAP (an array, e.g. valgrind and its options)
# runs in front of the server when set. Strowger: the release binary with the bench dial
# plan (`BENCH_BIN` another binary, e.g. a saved build to alternate with); `BENCH_T1_MS` sets
# its T1, `BENCH_WORKERS` its `sip.workers` (default 1). Kamailio: benches/kamailio/ with $KAM_CHILDREN workers
# and its TLSF memory manager (`KAM_MEM`, default `-x tlsf`: its lowest CPU per call here,
# 106 µs against 182 µs with the default `qm`, whose free-list walk in `qm_malloc` took
# half its CPU; `KAM_MEM=` gives the default back).
start_strowger() {
  local port=$1 http
  http=$(free_tcp_port)
  HTTP_PORT=$http
  cat > "$WORK/plan.lua" <<LUA
-- Bench dial plan: the Kamailio comparator's decision (benches/kamailio/route.lua.in):
-- a Request-URI without a user gets 404, every other call goes to the one callee.
function on_invite(call)
  if call.ruri.user == nil then
    call:reject(404, "No such user")
    return
  end
  call:dial("sip:service@127.0.0.1:$UAS_PORT")
end
LUA
  cat > "$WORK/strowger.toml" <<TOML
[sip]
listen = ["udp:127.0.0.1:$port"]
workers = ${BENCH_WORKERS:-1}
[http]
listen = "127.0.0.1:$http"
[sip.timers]
t1_ms = ${BENCH_T1_MS:-500}
[log]
level = "warn"
[script]
path = "$WORK/plan.lua"
${BENCH_EXTRA_TOML:-}
TOML
  ${WRAP[@]+"${WRAP[@]}"} "${BENCH_BIN:-$ROOT/target/release/strowger}" run --config "$WORK/strowger.toml" \
    2>>"$WORK/strowger.log" &
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  wait_answering "$port"
}

start_kamailio() {
  local port=$1
  mkdir -p "$WORK/kam"
  sed -e "s|@LISTEN@|127.0.0.1:$port|" -e "s|@LUA@|$WORK/route.lua|" \
    -e "s|@CHILDREN@|${KAM_CHILDREN:-4}|" \
    "$ROOT/benches/kamailio/kamailio.cfg.in" > "$WORK/kamailio.cfg"
  sed -e "s|@CALLEE@|127.0.0.1:$UAS_PORT|" "$ROOT/benches/kamailio/route.lua.in" > "$WORK/route.lua"
  ${WRAP[@]+"${WRAP[@]}"} kamailio -f "$WORK/kamailio.cfg" -D -E -Y "$WORK/kam" \
    -P "$WORK/kam/kamailio.pid" -m 512 -M 16 ${KAM_MEM--x tlsf} -w "$WORK/kam" 2>>"$WORK/kamailio.log" &
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  wait_answering "$port"
}

# Installs what a bench needs from the distribution when it is missing (`kamailio` = the
# server and its Lua module).
need_packages() {
  local need=() p
  for p in "$@"; do
    case $p in
      sipp) command -v sipp >/dev/null || need+=(sip-tester) ;;
      kamailio)
        command -v kamailio >/dev/null || need+=(kamailio)
        [ -e /usr/lib/x86_64-linux-gnu/kamailio/modules/app_lua.so ] || need+=(kamailio-lua-modules) ;;
      valgrind) command -v callgrind_control >/dev/null || need+=(valgrind) ;;
      perf) command -v perf >/dev/null || need+=(linux-perf) ;;
    esac
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

# SIPp's built-in uac: `calls` calls at `rate` per second to 127.0.0.1:`port` (extra SIPp
# options after). Prints "successful failed retransmissions".
run_uac() {
  local port=$1 calls=$2 rate=$3; shift 3
  local uac_port stf
  uac_port=$(free_port)
  stf="$WORK/uac-$port-$rate-$calls-$RANDOM.csv"
  sipp -sn uac -s service -i 127.0.0.1 -p "$uac_port" "${SIPP_BUF[@]}" -m "$calls" -r "$rate" -l $((rate * 4 + 100)) \
    -nostdin -timeout $((calls / rate + 60))s -trace_stat -stf "$stf" -fd 1 "$@" \
    127.0.0.1:"$port" >/dev/null 2>&1 || true
  echo "$(stat_col "$stf" 'SuccessfulCall(C)') $(stat_col "$stf" 'FailedCall(C)') $(stat_col "$stf" 'Retransmissions(C)')"
}
# Context switches of every live thread of a process and its children: "voluntary
# nonvoluntary" (waits for work, preemptions). Threads that have exited are not in it
# (perf's count in benches/callgrind.sh is).
ctxt_switches() {
  local v=0 n=0 p a b
  for p in $(all_pids "$1"); do
    read -r a b < <(cat /proc/"$p"/task/*/status 2>/dev/null \
      | awk '/^voluntary_ctxt_switches/{v+=$2} /^nonvoluntary_ctxt_switches/{n+=$2} END{print v+0, n+0}')
    v=$((v + a)); n=$((n + b))
  done
  echo "$v $n"
}

# A criterion bench's counting mode under callgrind (the figure the machine's load does not
# move): builds `cargo bench --bench NAME` unless NO_BUILD=1, runs it with the environment
# ENV (e.g. PARSE_CALLS=5000) counting only inside the functions matching TOGGLE, and sets
# CG_IR to the instructions collected and CG_OUT to the callgrind file (in CG_DIR,
# removed at exit).
callgrind_bench() { # name toggle env
  local name=$1 toggle=$2 env=$3 bin
  need_packages valgrind
  if [ "${NO_BUILD:-0}" != 1 ]; then
    cargo bench --bench "$name" --no-run >&2
  fi
  bin=$(ls -t target/release/deps/"$name"-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
  [ -x "$bin" ] || { echo "no $name bench binary under target/release/deps" >&2; exit 1; }
  CG_DIR=$(mktemp -d)
  trap 'rm -rf "$CG_DIR"' EXIT
  env "$env" valgrind --tool=callgrind --callgrind-out-file="$CG_DIR/cg.out" \
    --toggle-collect="$toggle" "$bin" >"$CG_DIR/stdout" 2>"$CG_DIR/stderr"
  CG_IR=$(awk '/Collected/{print $4}' "$CG_DIR/stderr")
  [ -n "$CG_IR" ] || { cat "$CG_DIR/stderr" >&2; exit 1; }
  CG_OUT=$CG_DIR/cg.out
}
