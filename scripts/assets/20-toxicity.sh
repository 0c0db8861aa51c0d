#!/usr/bin/env bash
# The toxicity reward's classifier: export alt-profanity-check's scikit-learn model
# (installed into the venv by setup.sh) to data/rewards/toxicity-linear.json, which
# the Rust scorer reads. Runs once: skipped while the output is newer than the script.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${QUARK_VENV:-$PWD/.venv}
out=data/rewards/toxicity-linear.json
script=scripts/export_toxicity.py
if [ -s "$out" ] && [ "$out" -nt "$script" ] && [ "$out" -nt "$0" ]; then
  exit 0
fi
echo "setup: exporting the toxicity classifier to $out" >&2
"$venv/bin/python" "$script" "$out" >/dev/null
