# Shell helpers shared by the benchmark scripts (sourced; needs $ROOT).
HZ=$(getconf CLK_TCK)

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

# A bench run's scratch dir ($WORK), the PIDs it starts ($PIDS, killed on exit), and
# SIPp's built-in uas answering every call on $UAS_PORT. `tag` names the scratch dir.
bench_setup() {
  WORK=$(mktemp -d "/tmp/strowger-$1.XXXXXX")
  PIDS=()
  trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true' EXIT
  UAS_PORT=$(free_port)
  sipp -sn uas -i 127.0.0.1 -p "$UAS_PORT" -nostdin -bg >/dev/null 2>&1 || true
  UAS_PID=$(pgrep -f "sipp -sn uas -i 127.0.0.1 -p $UAS_PORT" | head -1)
  PIDS+=("$UAS_PID")
}
