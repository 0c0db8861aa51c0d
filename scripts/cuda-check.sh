#!/usr/bin/env bash
# The CUDA check, for a machine with an NVIDIA GPU (CI and the CPU tests never need
# one): the fit tests on CUDA (f32 and bf16: each loss term, the gradients with and
# without checkpointing, N+N = 2N steps, the checkpoint in transformers, the learning
# loop), then the default model sampled and fitted on CUDA in f32 and bf16, with the
# fit's tokens/s and the GPU's peak memory. Writes its log to OUT (default
# target/cuda-check/). QUARK_CHECK_DEVICE=cpu QUARK_CHECK_STEPS=2 runs the same
# round on the CPU, to try the script itself.
#
# Usage: scripts/cuda-check.sh [OUT]
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
out=${1:-target/cuda-check}
mkdir -p "$out"
exec > >(tee "$out/log") 2>&1
device=${QUARK_CHECK_DEVICE:-cuda}
steps=${QUARK_CHECK_STEPS:-20}
# GPU memory in use (MiB), sampled every 200 ms into $1 while the fit runs.
gpu_mem() {
  if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 >"$1"
  else
    echo 0 >"$1"
  fi
}

[ "$device" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
QUARK_TEST_DEVICE=$device scripts/test.sh -p quark --test lib fit::

model=data/models/smollm2-135m
prompts=$out/prompts.jsonl
head -n 64 data/prompts/toxicity/train.jsonl >"$prompts"
for dtype in f32 bf16; do
  dir=$out/$dtype
  rm -rf "$dir" && mkdir -p "$dir"
  generations=$(quark-sample --model "$model" --prompts "$prompts" --out "$dir/" --device "$device" \
    --dtype "$dtype" --samples-per-prompt 4 --max-new-tokens 20 --batch-size 64 --quiet)
  scored=$(quark-score --in "$generations" --scorer toxicity --out "$dir/")
  pool=$(quark-bin --in "$scored" --quantiles 5 --out "$dir/")
  gpu_mem "$dir/gpu-mem" &
  smi=$!
  checkpoint=$(quark-fit --pool "$pool" --policy "$model" --reference "$model" --out "$dir/policy" \
    --device "$device" --dtype "$dtype" --steps "$steps" --batch-size 64 --warmup-steps 2 --quiet)
  kill "$smi" 2>/dev/null || true
  python - "$checkpoint/metrics.parquet" "$dir/gpu-mem" "$device $dtype" "$steps" <<'PY'
import sys, duckdb
metrics, mem, what, steps = sys.argv[1:]
loss, kl, tps = duckdb.sql(
    f"select last(loss order by step), last(kl order by step), median(tokens_per_s) from '{metrics}'"
).fetchall()[0]
peak = max(int(line) for line in open(mem) if line.strip())
print(f"{what}: {steps} fit steps of 64 rows, last loss {loss:.4f}, kl {kl:.4f}, "
      f"median {tps:.0f} completion tokens/s, GPU memory at most {peak} MiB")
PY
done
