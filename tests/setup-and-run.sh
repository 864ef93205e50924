#!/usr/bin/env bash
# Installs what the tests need (SIPp, redis-server, prometheus, iproute2, iptables, dnsmasq,
# chromium, kamailio and tests/browser's npm packages) and runs every test. This is the README's test
# command and exactly what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v sipp >/dev/null 2>&1 || need+=(sip-tester)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# tests/loss.rs: network namespaces, veth and iptables' random drop.
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
# tests/dns.rs: a real DNS server with NAPTR, SRV and A records for the RFC 3263 locator.
[ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
# tests/secure_calls.rs: a real softphone (baresip) registering and calling over TLS.
command -v baresip >/dev/null 2>&1 || need+=(baresip-core)
# tests/browser_phones.rs: JsSIP phones in headless Chromium (Node drives them, tests/browser).
[ -x /usr/bin/chromium ] || need+=(chromium)
# tests/cluster.rs: the reference cluster deployment (deploy/) has Kamailio's dispatcher in front.
command -v kamailio >/dev/null 2>&1 || need+=(kamailio)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# The browser test's npm packages (pinned in tests/browser/package-lock.json; Node >= 20).
if [ ! -d tests/browser/node_modules ]; then
  if command -v npm >/dev/null 2>&1; then
    (cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
  else
    echo "npm is missing: tests/browser_phones.rs will be skipped"
  fi
fi

# Disk: a CI machine may have little room (one run failed with "No space left on device"
# while linking). A fresh clone gains nothing from incremental builds, and line tables are
# all a test's backtrace needs: together they cut the debug build from tens of GB to a few.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
export CARGO_PROFILE_DEV_DEBUG="${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}"
df -h . | tail -1 | awk '{print "disk before the build: " $4 " free of " $2}'

status=0
cargo test --no-fail-fast || status=$?
df -h . | tail -1 | awk '{print "disk after the tests: " $4 " free of " $2}'
# Issue 15 item 5: a short coverage-guided run of both fuzz targets (fuzz/README.md); a
# crash, a hang or running out of memory fails the run.
FUZZ_SECONDS=20 bash fuzz/run.sh
exit $status
