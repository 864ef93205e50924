#!/usr/bin/env bash
# Instructions per `on_invite` (issue 14, target 5), the figure the machine's load does not
# move: the lua_hook bench's `LUA_HOOK_CALLS` mode (the VM on the calling thread, the
# default) under `valgrind --tool=callgrind`, counting only inside its `measured_calls`
# (2,000 runs to warm up, then CALLS), divided by the runs counted.
#
# Usage: bash benches/lua_hook_callgrind.sh                 (the bench's dial plan, CALLS=3000)
#        PLAN_FILE=/path/plan.lua bash benches/lua_hook_callgrind.sh   (another plan)
#        NO_BUILD=1 skips the build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
need_packages valgrind
CALLS=${CALLS:-3000}
if [ "${NO_BUILD:-0}" != 1 ]; then
  cargo bench --bench lua_hook --no-run >&2
fi
bin=$(ls -t target/release/deps/lua_hook-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
[ -x "$bin" ] || { echo "no lua_hook bench binary under target/release/deps" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
LUA_HOOK_CALLS=$CALLS valgrind --tool=callgrind --callgrind-out-file="$out/cg.out" \
  --toggle-collect='*measured_calls*' "$bin" >"$out/stdout" 2>"$out/stderr"
ir=$(awk '/Collected/{print $4}' "$out/stderr")
[ -n "$ir" ] || { cat "$out/stderr" >&2; exit 1; }
runs=$((CALLS + 2000))
plan=${PLAN_FILE:-"the bench's dial plan"}
echo "plan: $plan"
echo "instructions per on_invite: $((ir / runs)) ($ir over $runs runs)"
