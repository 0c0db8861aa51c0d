#!/usr/bin/env bash
# Study (docs/study.md, "Where the control tokens start"): do the control tokens
# come to mean anything when they start apart? On the train prompts only: the pool
# is the reference's samples of every train prompt (the task's iteration 0 with
# PILOT_SAMPLES samples per prompt), and each checkpoint is judged on the first
# PILOT_JUDGE train prompts (they are in the pool too) by its samples at
# <|quark:0|> and <|quark:K-1|> against the reference's, all with the same seed.
# For each start in PILOT_INITS (quark-fit --control-init), a fit of PILOT_STEPS
# steps in all (each entry continues the one before), judged after each entry and
# before the first step. Every stage is content-hashed: a rerun redoes nothing.
#
# Usage: control_init_pilot.sh [TASK]
#   PILOT_INITS="mean numerals" PILOT_STEPS="120 320" PILOT_LR=1e-4
#   PILOT_CONTROL_LR_SCALE=1 PILOT_SAMPLES=8 PILOT_JUDGE=100
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
source scripts/task_env.sh
config=$(task_file "${1:-toxicity}")
load_task "$config"
out=${PILOT_DIR:-data/study/control-init}
inits=${PILOT_INITS:-mean numerals}
steps=${PILOT_STEPS:-120 320}
lr=${PILOT_LR:-1e-4}
scale=${PILOT_CONTROL_LR_SCALE:-1}
samples=${PILOT_SAMPLES:-8}
last=$((QUANTILES - 1))
mkdir -p "$out"
head -n "${PILOT_JUDGE:-100}" "$TRAIN_PROMPTS" >"$out/judge.jsonl"

# sample MODEL CONDITION PROMPTS SEED SAMPLES: the scored samples (the task's reward).
sample() {
  local g
  g=$(quark-sample --model "$1" --prompts "$3" --out "$out/" --condition "$2" --iteration 0 \
    --seed "$4" --samples-per-prompt "$5" --max-new-tokens "$MAX_NEW_TOKENS" \
    --min-new-tokens "$MIN_NEW_TOKENS" --top-p "$TOP_P" --batch-size "$SAMPLE_BATCH" \
    --dtype "$DTYPE" --quiet)
  quark-score --in "$g" --scorer "$SCORER" --out "$out/"
}
# judge NAME MODEL: the model at <|quark:0|> and <|quark:K-1|> against the reference.
judge() {
  local q0 qk
  q0=$(sample "$2" 0 "$out/judge.jsonl" 2 "$samples")
  qk=$(sample "$2" "$last" "$out/judge.jsonl" 2 "$samples")
  echo "pilot: $1" >&2
  quark-eval --in "$reference" "$q0" "$qk" --out "$out/reports/$1/" >/dev/null
}

scored=$(sample "$MODEL" none "$TRAIN_PROMPTS" "$SEED" "$samples")
pool=$(quark-bin --in "$scored" --quantiles "$QUANTILES" --out "$out/")
reference=$(sample "$MODEL" none "$out/judge.jsonl" 2 "$samples")
for init in $inits; do
  policy=$out/$init-0
  quark-fit --pool "$pool" --policy "$MODEL" --reference "$MODEL" --out "$policy" --steps 0 \
    --control-init "$init" --seed "$SEED" --dtype "$DTYPE" --quiet >/dev/null
  judge "$init-0" "$policy"
  done_steps=0
  for total in $steps; do
    next=$out/$init-$total
    quark-fit --pool "$pool" --policy "$policy" --reference "$MODEL" --out "$next" \
      --steps "$((total - done_steps))" --batch-size "$BATCH_SIZE" --lr "$lr" \
      --warmup-steps "$WARMUP_STEPS" --schedule constant --kl-coef "$KL_COEF" \
      --entropy-coef 0 --control-lr-scale "$scale" --seed "$SEED" \
      --dtype "$DTYPE" --quiet >/dev/null
    judge "$init-$total" "$next"
    policy=$next
    done_steps=$total
  done
done
