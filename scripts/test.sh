#!/usr/bin/env bash
# Runs every test in release mode (tests run models) and closes with one summary
# line over all test binaries: "test: N passed, N failed, N ignored".
set -euo pipefail
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --release --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } }
     END { printf "test: %d passed, %d failed, %d ignored\n", p, f, g }' "$log"
exit "$status"
