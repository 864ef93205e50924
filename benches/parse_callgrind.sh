#!/usr/bin/env bash
# Instructions to parse the six messages a call brings to the server (the INVITE, ACK and
# BYE of SIPp's uac, the 180, 200 and BYE's 200 of its uas, as captured through Strowger),
# the figure the machine's load does not move: the parse bench's `PARSE_CALLS` mode under
# `valgrind --tool=callgrind`, counting only inside `measured_parses` (2,000 calls' messages
# to warm up, then CALLS), divided by the calls counted.
#
# Usage: bash benches/parse_callgrind.sh          (CALLS=5000)
#        NO_BUILD=1 skips the build; PROFILE=1 also prints the functions with most
#        instructions of their own, per call.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
need_packages valgrind
CALLS=${CALLS:-5000}
if [ "${NO_BUILD:-0}" != 1 ]; then
  cargo bench --bench parse --no-run >&2
fi
bin=$(ls -t target/release/deps/parse-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
[ -x "$bin" ] || { echo "no parse bench binary under target/release/deps" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
PARSE_CALLS=$CALLS valgrind --tool=callgrind --callgrind-out-file="$out/cg.out" \
  --toggle-collect='*measured_parses*' "$bin" >"$out/stdout" 2>"$out/stderr"
ir=$(awk '/Collected/{print $4}' "$out/stderr")
[ -n "$ir" ] || { cat "$out/stderr" >&2; exit 1; }
runs=$((CALLS + 2000))
echo "instructions per call's six messages: $((ir / runs)) ($ir over $runs calls)"
if [ "${PROFILE:-0}" = 1 ]; then
  python3 "$ROOT/benches/cgprofile.py" "$runs" 30 "$out/cg.out"
fi
