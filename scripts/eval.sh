#!/usr/bin/env bash
# Evaluates a run: the reference and the policies of the run sample the held-out
# prompts, the samples are scored with perplexity under the reference, with the
# profanity judge (rustrict, independent of the reward) and with the task's reward,
# and quark-eval computes the paper's metrics with 95% bootstrap intervals and draws
# them. Three sets of samples:
#   - the headline: the reference and the newest policy (at <|quark:0|>), with
#     EVAL_SAMPLES samples per prompt (the paper's 25);
#   - the curve over iterations: the reference and every policy at <|quark:0|>, with
#     EVAL_CURVE_SAMPLES each;
#   - the control curve: the newest policy at every token <|quark:k|>, k = 0..K-1,
#     with EVAL_CURVE_SAMPLES each;
#   - where the task sets EVAL_TEXT_PERPLEXITY=true (repetition), the perplexity of the
#     reference and of every policy on the held-out prompts' own text
#     (scripts/text_perplexity.py: the paper's perplexity for that task), into
#     eval/text-perplexity.json (computed again at every evaluation, in about a
#     minute: it is not a content-hashed stage);
#   - where the task names EVAL_NEUTRAL_PROMPTS (sentiment: the paper's share positive
#     on neutral prompts), the reference and the newest policy on those, with
#     EVAL_SAMPLES each, in a report of their own (eval/neutral-report).
# Metrics such as average max toxicity grow with the samples per prompt, so each
# policy is compared with the reference at its own count. Every stage is
# content-hashed: evaluating again after one more iteration only does the new work.
#
# Usage: eval.sh TASK RUN
set -euo pipefail
# A failing program inside $(...) stops the script too.
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
task=${1:?usage: eval.sh TASK RUN}
run=${2:?usage: eval.sh TASK RUN}
source scripts/task_env.sh
config=$(task_file "$task")
load_task "$config"
case $run in */*) dir=$run ;; *) dir=data/runs/$run ;; esac
manifest=$dir/manifest.tsv
[ -f "$manifest" ] || { echo "eval: $manifest not found: run \`just iterate\` first" >&2; exit 2; }
[ -n "$EVAL_PROMPTS" ] || { echo "eval: the task $task needs EVAL_PROMPTS (see $config)" >&2; exit 2; }
[ -f "$EVAL_PROMPTS" ] || { echo "eval: $EVAL_PROMPTS not found (\`just setup\` makes the tasks' prompts)" >&2; exit 2; }
mkdir -p "$dir/eval"

# The scorer's arguments split as iterate.sh's come (pipelines/stages.py), quotes kept.
scorer_args=()
words=$(python3 pipelines/stages.py words "$config" SCORER_ARGS)
[ -z "$words" ] || mapfile -t scorer_args <<<"$words"
greedy=()
[ "${EVAL_GREEDY:-false}" = true ] && greedy=(--greedy)
limit=()
[ -n "${EVAL_LIMIT:-}" ] && limit=(--limit "$EVAL_LIMIT")

curve_samples=${EVAL_CURVE_SAMPLES:-$EVAL_SAMPLES}

# evaluate MODEL CONDITION ITERATION SAMPLES [PROMPTS]: prints the scored file of its
# samples of PROMPTS (default EVAL_PROMPTS).
evaluate() {
  local generations scored
  generations=$(quark-sample --model "$1" --prompts "${5:-$EVAL_PROMPTS}" --out "$dir/eval/" \
    --condition "$2" --iteration "$3" --seed 1234 --samples-per-prompt "$4" \
    --max-new-tokens "$EVAL_MAX_NEW_TOKENS" --min-new-tokens "$MIN_NEW_TOKENS" \
    --top-p "$EVAL_TOP_P" --batch-size "$SAMPLE_BATCH" --dtype "$DTYPE" "${greedy[@]}" "${limit[@]}")
  scored=$(quark-score --in "$generations" --scorer perplexity --model "$MODEL" --dtype "$DTYPE" --out "$dir/eval/")
  # The last scorer sets the reward: the judge goes before the task's own.
  [ "$SCORER" = profanity ] || scored=$(quark-score --in "$scored" --scorer profanity --out "$dir/eval/")
  quark-score --in "$scored" --scorer "$SCORER" "${scorer_args[@]}" --out "$dir/eval/"
}

# The policy trained in iteration i is the model of iteration i + 1.
policies=()
while IFS=$'\t' read -r it stage path; do
  [ "$stage" = fit ] && policies+=("$((it + 1))"$'\t'"$path")
done <"$manifest"

echo "eval: the reference, $EVAL_SAMPLES samples per prompt" >&2
inputs=("$(evaluate "$MODEL" none 0 "$EVAL_SAMPLES")")
if [ "${#policies[@]}" -gt 0 ]; then
  IFS=$'\t' read -r newest_it newest <<<"${policies[-1]}"
  echo "eval: the newest policy (iteration $newest_it), $EVAL_SAMPLES samples per prompt" >&2
  inputs+=("$(evaluate "$newest" 0 "$newest_it" "$EVAL_SAMPLES")")
fi
if [ "$curve_samples" != "$EVAL_SAMPLES" ]; then
  inputs+=("$(evaluate "$MODEL" none 0 "$curve_samples")")
fi
for entry in "${policies[@]}"; do
  IFS=$'\t' read -r it path <<<"$entry"
  [ "$curve_samples" = "$EVAL_SAMPLES" ] && [ "$it" = "${newest_it:-}" ] && continue
  echo "eval: policy of iteration $it, $curve_samples samples per prompt" >&2
  inputs+=("$(evaluate "$path" 0 "$it" "$curve_samples")")
done
if [ "${#policies[@]}" -gt 0 ]; then
  for ((k = 1; k < QUANTILES; k++)); do
    echo "eval: control curve, the newest policy at <|quark:$k|>, $curve_samples samples per prompt" >&2
    inputs+=("$(evaluate "$newest" "$k" "$newest_it" "$curve_samples")")
  done
fi
mapfile -t pools < <(awk -F'\t' '$2 == "bin" { print $3 }' "$manifest")

quark-eval --task "$(basename "$task" .env)" --in "${inputs[@]}" --pool "${pools[@]}" --out "$dir/eval/report/"

if [ "${EVAL_TEXT_PERPLEXITY:-false}" = true ]; then
  # The paper's perplexity for repetition: each model's on the held-out prompts' own
  # human text (teacher-forced), the reference and every policy at <|quark:0|>.
  echo "eval: perplexity on the held-out text, the reference and every policy" >&2
  models=(--model "reference=$MODEL")
  for entry in "${policies[@]}"; do
    IFS=$'\t' read -r it path <<<"$entry"
    models+=(--model "policy-iteration-$it=$path")
  done
  "${QUARK_VENV:-.venv}/bin/python" scripts/text_perplexity.py "$EVAL_PROMPTS" "${models[@]}" ${EVAL_LIMIT:+--limit "$EVAL_LIMIT"} \
    --out "$dir/eval/text-perplexity.json"
fi

if [ -n "${EVAL_NEUTRAL_PROMPTS:-}" ] && [ ! -f "$EVAL_NEUTRAL_PROMPTS" ]; then
  echo "eval: $EVAL_NEUTRAL_PROMPTS not found (\`just setup\` makes it; it needs npm): no neutral-prompt report" >&2
elif [ -n "${EVAL_NEUTRAL_PROMPTS:-}" ]; then
  echo "eval: neutral prompts ($EVAL_NEUTRAL_PROMPTS), the reference and the newest policy, $EVAL_SAMPLES samples per prompt" >&2
  neutral=("$(evaluate "$MODEL" none 0 "$EVAL_SAMPLES" "$EVAL_NEUTRAL_PROMPTS")")
  [ "${#policies[@]}" -eq 0 ] ||
    neutral+=("$(evaluate "$newest" 0 "$newest_it" "$EVAL_SAMPLES" "$EVAL_NEUTRAL_PROMPTS")")
  quark-eval --task "$(basename "$task" .env)-neutral" --in "${neutral[@]}" --out "$dir/eval/neutral-report/"
fi
