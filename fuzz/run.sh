#!/usr/bin/env bash
# Builds the fuzz targets and runs each for FUZZ_SECONDS (default 60) under libFuzzer.
#
#   bash fuzz/run.sh                    # every target, 60 s each
#   FUZZ_SECONDS=20 bash fuzz/run.sh    # the CI run
#   FUZZ_SECONDS=1800 bash fuzz/run.sh handler
#
# Seeds: fuzz/corpus/<target> (kept in the repository, minimized) and, when present,
# ../shared/conformance/* (the RFC 4475 / RFC 5118 torture sets, read in place, never
# copied here). New finds go to fuzz/scratch/<target> (git-ignored), not to the kept
# corpus; to fold them in: see fuzz/README.md. Exits non-zero on a crash, a timeout
# (a hang: -timeout) or running out of memory (-rss_limit_mb), and prints the reproducer
# in fuzz/artifacts/<target>/.
#
# Why plain cargo and RUSTFLAGS, not `cargo fuzz`: only the stable toolchain is here.
# libfuzzer-sys builds libFuzzer from source with the C++ compiler; the coverage
# instrumentation is LLVM's SanitizerCoverage asked for with -Cpasses=sancov-module and its
# llvm-args (the flags cargo-fuzz passes), which stable rustc accepts. No sanitizer: ASan
# needs -Zsanitizer (nightly); the targets are safe Rust, where a bug is a panic, and
# memory growth is caught by -rss_limit_mb and the handler's own checks.
#
# Environment: FUZZ_SECONDS (per target), FUZZ_RSS_MB (default 2048), FUZZ_TIMEOUT
# (seconds per input, default 10), FUZZ_JOBS (cargo build jobs), FUZZ_NICE (nice level
# of the fuzzers, default 0), FUZZ_ARGS (more libFuzzer flags).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
seconds="${FUZZ_SECONDS:-60}"
rss="${FUZZ_RSS_MB:-2048}"
timeout="${FUZZ_TIMEOUT:-10}"
nice_level="${FUZZ_NICE:-0}"
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(parse handler)

# libfuzzer-sys compiles libFuzzer (C++) with the cc crate: a C++ compiler is needed.
if ! command -v c++ >/dev/null && ! command -v g++ >/dev/null; then
    echo "fuzz: installing g++" >&2
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq && $sudo apt-get install -y -qq g++
fi

host="$(rustc -vV | sed -n 's/^host: //p')"
# SanitizerCoverage as cargo-fuzz asks for it: edge counters (inline 8-bit), the PC table
# (for cov: and ft: figures), compare tracing (libFuzzer learns the bytes compared).
# `--cfg fuzzing` as cargo-fuzz sets it. --target keeps the flags off build scripts and
# proc macros.
export RUSTFLAGS="${RUSTFLAGS:-} --cfg fuzzing -Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 -Cllvm-args=-sanitizer-coverage-stack-depth"
jobs=()
[ -n "${FUZZ_JOBS:-}" ] && jobs=(-j "$FUZZ_JOBS")
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
echo "fuzz: building ${targets[*]} (release, $host)" >&2
cargo build --release --target "$host" "${jobs[@]}" "${bins[@]}"

seeds_extra=()
if [ -d ../../shared/conformance ]; then
    for d in ../../shared/conformance/*/; do seeds_extra+=("$d"); done
fi

status=0
for t in "${targets[@]}"; do
    bin="target/$host/release/$t"
    scratch="scratch/$t"
    artifacts="artifacts/$t/"
    mkdir -p "$scratch" "$artifacts" "corpus/$t"
    log="scratch/$t.log"
    dict=()
    [ -f "sip.dict" ] && dict=(-dict=sip.dict)
    echo "fuzz: $t for ${seconds}s (seeds: corpus/$t ${seeds_extra[*]})" >&2
    set +e
    nice -n "$nice_level" "$bin" "$scratch" "corpus/$t" "${seeds_extra[@]}" \
        -max_total_time="$seconds" -rss_limit_mb="$rss" -timeout="$timeout" \
        -artifact_prefix="$artifacts" -print_final_stats=1 "${dict[@]}" \
        ${FUZZ_ARGS:-} 2>"$log"
    rc=$?
    set -e
    grep -E '^#[0-9]+ +(INITED|DONE)|^stat::' "$log" >&2 || true
    if [ $rc -ne 0 ]; then
        status=1
        tail -n 40 "$log" >&2
        echo "fuzz: $t FAILED (exit $rc); reproducer(s):" >&2
        grep -Eo "Test unit written to [^ ]+" "$log" | sed 's/^/  /' >&2 || true
        echo "  replay: $here/$bin <file>   (log: $here/$log)" >&2
    else
        echo "fuzz: $t ok" >&2
    fi
done
exit $status
