#!/usr/bin/env bash
# A profile-guided release build (PGO): the build a deployment that wants the lowest CPU
# per call runs. Three steps, each its own target directory so that the plain
# `target/release` build is left alone:
#   1. an instrumented build (`-Cprofile-generate`) in target/pgo-gen;
#   2. a training run of that build on loopback: SIPp's built-in uac calling through the
#      bench dial plan (benches/lib.sh) to SIPp's uas, and SIPp phones registering with
#      MD5 digest authentication (benches/register/register.xml) at the same time; then
#      the server is stopped with SIGTERM so that it writes its profile;
#   3. the profile merged with Debian's `llvm-profdata-<N>` (N = the LLVM major version of
#      this rustc; `llvm-<N>` installed with apt-get when missing: the rustup component
#      `llvm-tools` is not reachable from here) and the final build (`-Cprofile-use`) in
#      target/pgo: target/pgo/release/strowger.
# Benches run it with BENCH_BIN=target/pgo/release/strowger.
#
# Usage: bash benches/pgo.sh   (TRAIN_CALLS=20000 TRAIN_RATE=1000 TRAIN_USERS=2000
#                               TRAIN_REG_RATE=200; NO_GEN=1 reuses step 1's build)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TRAIN_CALLS=${TRAIN_CALLS:-20000}
TRAIN_RATE=${TRAIN_RATE:-1000}
TRAIN_USERS=${TRAIN_USERS:-2000}
TRAIN_REG_RATE=${TRAIN_REG_RATE:-200}
DOMAIN=strowger.test

# shellcheck source=benches/lib.sh
source "$ROOT/benches/lib.sh"
need_packages sipp
llvm_major=$(rustc -vV | awk '/^LLVM version/{split($3, v, "."); print v[1]}')
profdata=llvm-profdata-$llvm_major
if ! command -v "$profdata" >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "llvm-$llvm_major" >/dev/null
fi

bench_setup pgo
PROF=$WORK/profraw
if [ "${NO_GEN:-0}" != 1 ]; then
  RUSTFLAGS="-Cprofile-generate=$PROF" cargo build --release --quiet --target-dir target/pgo-gen
fi

python3 "$ROOT/benches/register/gen_users.py" "$TRAIN_USERS" "$DOMAIN" "$WORK"
port=$(free_port)
BENCH_EXTRA_TOML="
[registrar]
users_file = \"$WORK/users.toml\"
[auth]
algorithms = [\"MD5\"]
max_failures = 1000000
[shutdown]
drain_timeout_s = 1
" STROWGER_SIP__DOMAIN=$DOMAIN BENCH_BIN=$ROOT/target/pgo-gen/release/strowger \
  LLVM_PROFILE_FILE="$PROF/strowger-%p-%m.profraw" start_strowger "$port"
sipp -sf "$ROOT/benches/register/register.xml" -inf "$WORK/users.csv" -i 127.0.0.1 \
  -p "$(free_port)" -m "$TRAIN_USERS" -r "$TRAIN_REG_RATE" -nostdin -nd \
  -timeout "$((TRAIN_USERS / TRAIN_REG_RATE + 30))s" 127.0.0.1:"$port" >/dev/null 2>&1 &
reg_pid=$!
PIDS+=("$reg_pid")
read -r ok failed _ < <(run_uac "$port" "$TRAIN_CALLS" "$TRAIN_RATE")
wait "$reg_pid" && reg=ok || reg="failed ($?)"
echo "training: $ok calls completed, $failed failed; $TRAIN_USERS registrations: $reg" >&2
kill -TERM "$SERVER_PID"
wait "$SERVER_PID" || true
ls "$PROF"/strowger-*.profraw >/dev/null || { echo "the server wrote no profile" >&2; exit 1; }

# Only the server's profile: the instrumented build scripts of step 1 wrote their own.
"$profdata" merge -o "$WORK/strowger.profdata" "$PROF"/strowger-*.profraw
RUSTFLAGS="-Cprofile-use=$WORK/strowger.profdata" cargo build --release --quiet --target-dir target/pgo
echo "target/pgo/release/strowger"
