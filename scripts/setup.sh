#!/usr/bin/env bash
# Idempotent set-up: the Python venv (libtorch and the reference libraries), the
# release build, and the assets the default task needs. Each step is skipped when
# its inputs have not changed, so a second run takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
venv=${QUARK_VENV:-$root/.venv}
python=${PYTHON:-python3}

say() { echo "setup: $*" >&2; }

# 1. Python venv, keyed by the requirements file's content.
req_hash=$(sha256sum scripts/requirements.txt | cut -c1-16)
stamp=$venv/.quark-requirements-$req_hash
if [ ! -f "$stamp" ]; then
  if [ -n "${LIBTORCH:-}" ]; then
    say "LIBTORCH=$LIBTORCH is set: tch links against it; the venv still carries the Python references"
  fi
  say "creating $venv (torch 2.13.0 and the reference libraries; a few minutes the first time)"
  [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r scripts/requirements.txt
  rm -f "$venv"/.quark-requirements-*
  touch "$stamp"
fi

# 2. The programs (release: models run in them).
say "building the programs"
cargo build --release --quiet --bins

# 3. Assets of the default task are fetched and converted once each (content-hashed
#    by the programs that make them).
for step in scripts/assets/*.sh; do
  [ -e "$step" ] || continue
  bash "$step"
done
