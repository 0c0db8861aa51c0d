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
config=$task
[ -f "$config" ] || config=pipelines/$task.env
[ -f "$config" ] || { echo "iterate: no task config $config" >&2; exit 2; }
# shellcheck disable=SC1090
source "$config"
case $run in */*) dir=$run ;; *) dir=data/runs/$run ;; esac
mkdir -p "$dir"
manifest=$dir/manifest.tsv
[ -f "$manifest" ] || printf 'iteration\tstage\tpath\n' >"$manifest"
[ -n "$TRAIN_PROMPTS" ] || { echo "iterate: the task $task needs TRAIN_PROMPTS (see $config)" >&2; exit 2; }

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

  generations=$(quark-sample --model "$policy" --prompts "$TRAIN_PROMPTS" --out "$dir/" \
    --condition "$condition" --iteration "$it" --seed "$((SEED + it))" \
    --shard "$((it % PROMPT_SHARDS))/$PROMPT_SHARDS" --samples-per-prompt "$SAMPLES_PER_PROMPT" \
    --max-new-tokens "$MAX_NEW_TOKENS" --min-new-tokens "$MIN_NEW_TOKENS" --top-p "$TOP_P" \
    --batch-size "$SAMPLE_BATCH" --dtype "$DTYPE")
  record "$it" sample "$generations"

  # shellcheck disable=SC2086
  scored=$(quark-score --in "$generations" --scorer "$SCORER" $SCORER_ARGS --out "$dir/")
  record "$it" score "$scored"

  previous=$(awk -F'\t' -v i="$it" '$2 == "bin" && $1 < i { p = $3 } END { if (p) print p }' "$manifest")
  pool=$(quark-bin --in "$scored" ${previous:+--pool "$previous"} --quantiles "$QUANTILES" --out "$dir/")
  record "$it" bin "$pool"

  # shellcheck disable=SC2086
  checkpoint=$(quark-fit --pool "$pool" --policy "$policy" --reference "$MODEL" \
    --out "$dir/policy-$it" --steps "$FIT_STEPS" --total-steps "$((FIT_STEPS * ITERATIONS))" \
    --batch-size "$BATCH_SIZE" --grad-accum "$GRAD_ACCUM" --lr "$LR" --warmup-steps "$WARMUP_STEPS" \
    --kl-coef "$KL_COEF" --entropy-coef "$ENTROPY_COEF" --unlikelihood-coef "$UNLIKELIHOOD_COEF" \
    --seed "$SEED" --iteration "$it" --dtype "$DTYPE" ${FIT_ARGS:-})
  record "$it" fit "$checkpoint"
  echo "iterate: iteration $it done: $checkpoint" >&2
done
