#!/usr/bin/env bash
# Evaluates a run: the reference and every policy of the run sample the held-out
# prompts (the policy conditioned on <|quark:0|>), the samples are scored with the
# task's reward and with perplexity under the reference, and quark-eval computes the
# paper's metrics and draws them across iterations. Every stage is content-hashed, so
# evaluating again after one more iteration only does the new policy's work.
#
# Usage: eval.sh TASK RUN
set -euo pipefail
# A failing program inside $(...) stops the script too.
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
task=${1:?usage: eval.sh TASK RUN}
run=${2:?usage: eval.sh TASK RUN}
config=$task
[ -f "$config" ] || config=pipelines/$task.env
# shellcheck disable=SC1090
source "$config"
case $run in */*) dir=$run ;; *) dir=data/runs/$run ;; esac
manifest=$dir/manifest.tsv
[ -f "$manifest" ] || { echo "eval: $manifest not found: run \`just iterate\` first" >&2; exit 2; }
[ -n "$EVAL_PROMPTS" ] || { echo "eval: the task $task needs EVAL_PROMPTS (see $config)" >&2; exit 2; }
mkdir -p "$dir/eval"

# The scorer's arguments split as iterate.sh's come (pipelines/stages.py), quotes kept.
scorer_args=()
words=$(python3 pipelines/stages.py words "$config" SCORER_ARGS)
[ -z "$words" ] || mapfile -t scorer_args <<<"$words"
greedy=()
[ "${EVAL_GREEDY:-false}" = true ] && greedy=(--greedy)
limit=()
[ -n "${EVAL_LIMIT:-}" ] && limit=(--limit "$EVAL_LIMIT")

# evaluate MODEL CONDITION ITERATION: prints the scored file of its samples.
evaluate() {
  local generations scored
  generations=$(quark-sample --model "$1" --prompts "$EVAL_PROMPTS" --out "$dir/eval/" \
    --condition "$2" --iteration "$3" --seed 1234 --samples-per-prompt "$EVAL_SAMPLES" \
    --max-new-tokens "$EVAL_MAX_NEW_TOKENS" --min-new-tokens "$MIN_NEW_TOKENS" \
    --top-p "$EVAL_TOP_P" --batch-size "$SAMPLE_BATCH" --dtype "$DTYPE" "${greedy[@]}" "${limit[@]}")
  scored=$(quark-score --in "$generations" --scorer perplexity --model "$MODEL" --dtype "$DTYPE" --out "$dir/eval/")
  quark-score --in "$scored" --scorer "$SCORER" "${scorer_args[@]}" --out "$dir/eval/"
}

inputs=("$(evaluate "$MODEL" none 0)")
# The policy trained in iteration i is the model of iteration i + 1.
while IFS=$'\t' read -r it stage path; do
  [ "$stage" = fit ] || continue
  echo "eval: policy of iteration $it" >&2
  inputs+=("$(evaluate "$path" 0 "$((it + 1))")")
done <"$manifest"
mapfile -t pools < <(awk -F'\t' '$2 == "bin" { print $3 }' "$manifest")

quark-eval --task "$(basename "$task" .env)" --in "${inputs[@]}" --pool "${pools[@]}" --out "$dir/eval/report/"
