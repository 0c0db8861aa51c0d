#!/usr/bin/env bash
# The toxicity study (docs/study.md): what makes the policy learn the control tokens,
# on the train prompts only. The train prompts are split once: every 5th prompt (the
# first 100 of them) is the dev set the study judges on, the rest train; the
# held-out prompts are never read. On one fixed pool (the reference's samples of the
# study's train prompts, binned into K quantiles) it measures:
#   - the noise floor: the reference on dev with two sampling seeds, and a policy
#     that has the control tokens but no training, at <|quark:0|> and <|quark:K-1|>;
#   - runs of learning rate, α (the entropy bonus) and the control tokens' learning
#     rate scale (quark-fit --control-lr-scale), one per STUDY_RUNS entry
#     LR:ALPHA:SCALE (warm-up, then constant), each judged at every one of
#     STUDY_STEPS by the gap between <|quark:0|> and <|quark:K-1|>, the difference to
#     the reference and the perplexity under the reference.
# Each judgement is a quark-eval report (95% intervals, differences to the
# reference); scripts/study_report.py gathers them into tables. Every stage is
# content-hashed: a rerun redoes nothing, and a longer STUDY_STEPS list only adds.
#
# Usage: study.sh [TASK]   (settings: the STUDY_* variables below)
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
source scripts/task_env.sh
source scripts/study_env.sh
config=$(task_file "${1:-toxicity}")
load_task "$config"
out=${STUDY_DIR:-data/study}
runs=${STUDY_RUNS:-1e-4:0.06:1 3e-4:0.06:1 1e-5:0.06:1 1e-4:0:1 1e-5:0.06:100 1e-5:0:100 1e-5:0:1000}
steps=${STUDY_STEPS:-50 200}
samples=${STUDY_SAMPLES:-5}
batch=${STUDY_BATCH:-16}
warmup=${STUDY_WARMUP:-10}
last=$((QUANTILES - 1))
mkdir -p "$out"

split_train "$TRAIN_PROMPTS" "$out"

# score FILE: perplexity under the reference, the profanity judge, the task's reward.
score() {
  local s
  s=$(quark-score --in "$1" --scorer perplexity --model "$MODEL" --dtype "$DTYPE" --out "$out/")
  s=$(quark-score --in "$s" --scorer profanity --out "$out/")
  quark-score --in "$s" --scorer "$SCORER" --out "$out/"
}
# judge MODEL CONDITION ITERATION [SEED]: the scored dev samples of MODEL.
judge() {
  local g
  g=$(quark-sample --model "$1" --prompts "$out/dev.jsonl" --out "$out/" --condition "$2" \
    --iteration "$3" --seed "${4:-1234}" --samples-per-prompt "$samples" \
    --max-new-tokens "$EVAL_MAX_NEW_TOKENS" --min-new-tokens "$MIN_NEW_TOKENS" \
    --top-p "$EVAL_TOP_P" --batch-size "$SAMPLE_BATCH" --dtype "$DTYPE" --quiet)
  score "$g"
}
# report NAME FILES...: a quark-eval report of FILES.
report() {
  local name=$1
  shift
  quark-eval --task toxicity --in "$@" --out "$out/reports/$name/" >/dev/null 2>&1
  log "$name: $out/reports/$name"
}
# fit POLICY STEPS LR ALPHA SCALE OUT: a fit of the fixed pool, constant after warm-up.
fit() {
  quark-fit --pool "$pool" --policy "$1" --reference "$MODEL" --out "$6" --steps "$2" \
    --batch-size "$batch" --lr "$3" --warmup-steps "$warmup" --schedule constant \
    --kl-coef "$KL_COEF" --entropy-coef "$4" --control-lr-scale "$5" --seed "$SEED" \
    --dtype "$DTYPE" --quiet 2>&1 | grep -v '^$' >&2 || true
  [ -f "$6/trainer_state.json" ] || { echo "study: the fit to $6 failed" >&2; exit 1; }
}

log "the fixed pool: the reference's samples of $(wc -l <"$out/train.jsonl") train prompts"
generations=$(quark-sample --model "$MODEL" --prompts "$out/train.jsonl" --out "$out/" \
  --condition none --iteration 0 --seed "$SEED" --samples-per-prompt "$SAMPLES_PER_PROMPT" \
  --max-new-tokens "$MAX_NEW_TOKENS" --min-new-tokens "$MIN_NEW_TOKENS" --top-p "$TOP_P" \
  --batch-size "$SAMPLE_BATCH" --dtype "$DTYPE" --quiet)
scored=$(quark-score --in "$generations" --scorer "$SCORER" --out "$out/")
pool=$(quark-bin --in "$scored" --quantiles "$QUANTILES" --out "$out/")

log "noise floor"
reference=$(judge "$MODEL" none 0)
report reference "$reference"
report reference-seed2 "$(judge "$MODEL" none 0 4321)"
fit "$MODEL" 0 1e-4 "$ENTROPY_COEF" 1 "$out/untrained"
report untrained "$reference" "$(judge "$out/untrained" 0 1)" "$(judge "$out/untrained" "$last" 1)"

for entry in $runs; do
  IFS=: read -r lr alpha scale <<<"$entry"
  name=lr-$lr-alpha-$alpha-scale-$scale
  policy=$MODEL
  done=0
  for s in $steps; do
    log "$name: fit to step $s"
    fit "$policy" "$((s - done))" "$lr" "$alpha" "$scale" "$out/$name/step-$s"
    policy=$out/$name/step-$s
    done=$s
    report "$name-step-$s" "$reference" "$(judge "$policy" 0 "$s")" "$(judge "$policy" "$last" "$s")"
  done
done
log "done: python3 scripts/study_report.py $out"
