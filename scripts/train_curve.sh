#!/usr/bin/env bash
# The loop's learning curve on its own train prompts, without the held-out ones: each
# iteration's samples (the reference's at iteration 0, the policy's at <|quark:0|>
# after) are already scored by the task's reward, so quark-eval gives each
# iteration's metrics with 95% intervals over prompts and its paired difference to
# iteration 0, at the loop's samples per prompt. This is what a study may choose
# settings by (docs/study.md); `just eval` is the held-out judgement.
#
# Usage: train_curve.sh RUN   (writes data/runs/RUN/train-curve/, or RUN/train-curve/)
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
run=${1:?usage: train_curve.sh RUN}
case $run in */*) dir=$run ;; *) dir=data/runs/$run ;; esac
manifest=$dir/manifest.tsv
[ -f "$manifest" ] || { echo "train_curve: $manifest not found" >&2; exit 2; }
mapfile -t scored < <(awk -F'\t' '$2 == "score" { print $3 }' "$manifest")
mapfile -t pools < <(awk -F'\t' '$2 == "bin" { print $3 }' "$manifest")
[ "${#scored[@]}" -gt 0 ] || { echo "train_curve: $manifest records no scored samples yet" >&2; exit 2; }
quark-eval --in "${scored[@]}" --pool "${pools[@]}" --out "$dir/train-curve/"
