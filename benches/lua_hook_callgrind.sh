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
CALLS=${CALLS:-3000}
callgrind_bench lua_hook '*measured_calls*' "LUA_HOOK_CALLS=$CALLS"
runs=$((CALLS + 2000))
plan=${PLAN_FILE:-"the bench's dial plan"}
echo "plan: $plan"
echo "instructions per on_invite: $((CG_IR / runs)) ($CG_IR over $runs runs)"
