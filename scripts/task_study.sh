#!/usr/bin/env bash
# A short study of a task's loop settings on its train prompts only: the train
# prompts are split once by line (every 5th, the first 100 of them, is the dev set;
# the rest train); each variant runs the task's own loop on the study's train
# prompts until it has STUDY_ITERATIONS iterations (default 2), then eval.sh judges
# it on the dev prompts (the task's own evaluation settings: greedy for
# repetition). The held-out prompts are never read. Each variant is the task file
# with some keys changed:
#
#   STUDY_RUNS='base:ENTROPY_COEF=0 ul-only:ENTROPY_COEF=0,QUANTILES=1'
#
# (name:KEY=VALUE,KEY=VALUE; a value may not hold a comma or a space). Every loop
# stage is content-hashed: a rerun trains nothing again, and more iterations only
# add. A variant's run is found by its name and its fits are counted: give a
# changed variant a new name (a rerun keeps the old run's iterations as they are).
# The runs go to data/study/TASK/NAME/; scripts/task_study_report.py prints their
# table.
#
# Usage: task_study.sh TASK   (settings: the STUDY_* variables)
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
task=${1:?usage: task_study.sh TASK}
source scripts/task_env.sh
source scripts/study_env.sh
config=$(task_file "$task")
name=$(basename "$config" .env)
out=${STUDY_DIR:-data/study/$name}
runs=${STUDY_RUNS:?set STUDY_RUNS, e.g. STUDY_RUNS='base:ENTROPY_COEF=0'}
iterations=${STUDY_ITERATIONS:-2}
train_prompts=$(python3 pipelines/stages.py get "$config" TRAIN_PROMPTS)
mkdir -p "$out"

split_train "$train_prompts" "$out"

for run in $runs; do
  variant=${run%%:*}
  changes=${run#*:}
  [ "$changes" != "$run" ] || changes=
  env=$out/$variant.env
  {
    cat "$config"
    echo "# task_study: the variant $variant, on the study's split of the train prompts"
    echo "TRAIN_PROMPTS=$out/train.jsonl"
    echo "EVAL_PROMPTS=$out/dev.jsonl"
    echo "EVAL_NEUTRAL_PROMPTS="
    [ -z "$changes" ] || tr ',' '\n' <<<"$changes"
  } >"$env"
  # Up to STUDY_ITERATIONS in all: the fits a rerun finds done count.
  done_fits=$(awk -F'\t' '$2 == "fit" { n++ } END { print n + 0 }' "$out/$variant/manifest.tsv" 2>/dev/null || echo 0)
  todo=$((iterations > done_fits ? iterations - done_fits : 0))
  log "$variant ($changes): $todo of $iterations iterations to run"
  [ "$todo" -eq 0 ] || scripts/iterate.sh "$env" "$out/$variant" "$todo"
  log "$variant: evaluation on the dev prompts"
  scripts/eval.sh "$env" "$out/$variant"
done
log "done"
