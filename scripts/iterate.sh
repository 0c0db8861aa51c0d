#!/usr/bin/env bash
# One Quark iteration of a run: sample -> score -> bin -> fit, each stage a program
# whose output is content-hashed, so a stage that already finished is skipped and an
# interrupted iteration picks up where it stopped. The run folder keeps a manifest
# (manifest.tsv: iteration, stage, path) of the file each stage produced.
#
# Usage: iterate.sh TASK RUN [N]
#   TASK  a name in pipelines/ (toxicity, sentiment, repetition) or a path to a .env file
#   RUN   the run's name: its files go to data/runs/RUN/ (or RUN itself if it has a /)
#   N     iterations to run (default 1); stops early when the task's ITERATIONS are done
set -euo pipefail
# A failing program inside $(...) stops the script too.
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
task=${1:?usage: iterate.sh TASK RUN [N]}
run=${2:?usage: iterate.sh TASK RUN [N]}
count=${3:-1}
source scripts/task_env.sh
config=$(task_file "$task")
# Each stage's command line comes from pipelines/stages.py, as the Airflow DAG's do.
stages() { python3 pipelines/stages.py "$@"; }
# run_stage STAGE NAME=VALUE...: runs the stage's program; it prints the path it wrote.
run_stage() {
  local args
  args=$(stages args "$1" "$config" "${@:2}")
  local -a cmd
  mapfile -t cmd <<<"$args"
  "${cmd[@]}"
}
MODEL=$(stages get "$config" MODEL)
ITERATIONS=$(stages get "$config" ITERATIONS)
case $run in */*) dir=$run ;; *) dir=data/runs/$run ;; esac
mkdir -p "$dir"
manifest=$dir/manifest.tsv
[ -f "$manifest" ] || printf 'iteration\tstage\tpath\n' >"$manifest"

# The newest path recorded for a stage (any iteration), or nothing.
latest() { awk -F'\t' -v s="$1" '$2 == s { p = $3 } END { if (p) print p }' "$manifest"; }
# Records a stage's output once.
record() {
  grep -qxF "$1	$2	$3" "$manifest" || printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$manifest"
}

for _ in $(seq "$count"); do
  it=$(awk -F'\t' '$2 == "fit" { n++ } END { print n + 0 }' "$manifest")
  if [ "$it" -ge "$ITERATIONS" ]; then
    echo "iterate: run $run has done its $ITERATIONS iterations (see $manifest)" >&2
    break
  fi
  echo "iterate: run $run, iteration $it" >&2
  if [ "$it" -eq 0 ]; then policy=$MODEL; condition=none; else policy=$(latest fit); condition=0; fi

  generations=$(run_stage sample it="$it" dir="$dir" policy="$policy" condition="$condition")
  record "$it" sample "$generations"

  scored=$(run_stage score it="$it" dir="$dir" generations="$generations")
  record "$it" score "$scored"

  previous=$(awk -F'\t' -v i="$it" '$2 == "bin" && $1 < i { p = $3 } END { if (p) print p }' "$manifest")
  pool=$(run_stage bin it="$it" dir="$dir" scored="$scored" previous="$previous")
  record "$it" bin "$pool"

  checkpoint=$(run_stage fit it="$it" dir="$dir" policy="$policy" pool="$pool")
  record "$it" fit "$checkpoint"
  echo "iterate: iteration $it done: $checkpoint" >&2
done
