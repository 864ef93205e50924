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
CALLS=${CALLS:-5000}
callgrind_bench parse '*measured_parses*' "PARSE_CALLS=$CALLS"
runs=$((CALLS + 2000))
echo "instructions per call's six messages: $((CG_IR / runs)) ($CG_IR over $runs calls)"
if [ "${PROFILE:-0}" = 1 ]; then
  python3 "$ROOT/benches/cgprofile.py" "$runs" 30 "$CG_OUT"
fi
