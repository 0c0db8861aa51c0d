# quark-rs: the Quark loop on a workstation. `just` lists the recipes.

set shell := ["bash", "-euo", "pipefail", "-c"]

# ---- what users change -------------------------------------------------------
# The task: a file in pipelines/ (toxicity, sentiment, repetition).
task := env("QUARK_TASK", "toxicity")
# The run's name: its files live in data/runs/<run>/.
run := env("QUARK_RUN", task)

# ---- environment -------------------------------------------------------------
# The Python venv with libtorch; QUARK_VENV points elsewhere (one venv for many clones).
venv := env("QUARK_VENV", justfile_directory() / ".venv")
export QUARK_VENV := venv
# tch links against the torch wheel in the venv (or $LIBTORCH when a user sets it).
export LIBTORCH_USE_PYTORCH := "1"
export PATH := venv / "bin" + ":" + justfile_directory() / "target/release" + ":" + env("PATH")

_default:
    @just --list -u

# ---- set-up ------------------------------------------------------------------
# Install what the loop needs (venv with libtorch, release build, assets); seconds when done.
setup:
    @scripts/setup.sh

# ---- the loop ----------------------------------------------------------------
# Run the next Quark iteration of the run (sample, score, bin, fit); stages already done are skipped.
iterate: setup
    @scripts/iterate.sh {{task}} {{run}} 1

# Run the next N iterations.
loop N: setup
    @scripts/iterate.sh {{task}} {{run}} {{N}}

# Evaluate every policy of the run and the reference on the held-out prompts; writes metrics and a plot.
eval: setup
    @scripts/eval.sh {{task}} {{run}}

# The run's learning curve on its own train prompts (each iteration's samples against
# the reference's, 95% intervals; no held-out prompt is read): data/runs/<run>/train-curve/.
train-curve: setup
    @scripts/train_curve.sh {{run}}

# The toxicity study (docs/study.md): noise floor, learning rate x steps, α, on a
# split of the train prompts; about 50 minutes on 2 cores with bf16. Its tables:
# `python3 scripts/study_report.py`.
study: setup
    @scripts/study.sh {{task}}
    @python3 scripts/study_report.py

# A short study of the task's loop settings on a split of its train prompts
# (scripts/task_study.sh; STUDY_RUNS names the variants, STUDY_ITERATIONS their
# length), then its table; the held-out prompts are never read.
task-study: setup
    @scripts/task_study.sh {{task}}
    @python3 scripts/task_study_report.py "$(basename {{task}} .env)" "${STUDY_DIR:-data/study/$(basename {{task}} .env)}"

# ---- checks ------------------------------------------------------------------
# Run every test (release mode: tests run models).
test: setup
    @scripts/test.sh

# Formatting and lints, as CI checks them.
lint: setup
    cargo fmt --all -- --check
    cargo clippy --release --workspace --all-targets --quiet -- -D warnings

# Load the Airflow DAG in a real Airflow (own venv in target/); with TASK RUN [W], run one iteration through it.
airflow-test *ARGS:
    @tests/python/airflow_dag_test.sh {{ARGS}}

# Exactly what CI runs.
ready: lint test

# On a machine with an NVIDIA GPU: the fit tests and a sample-score-bin-fit round on CUDA, f32 and bf16.
cuda-check: setup
    @scripts/cuda-check.sh

# Benchmarks against the Python baselines, each printing its ratio. QUARK_BENCH_ROUNDS=N
# measures the sampling and fit-step rows N times in turn (A B A B) and keeps each
# one's best: on a machine whose speed drifts, both sides then get the same chance.
bench: setup
    cargo bench --quiet -p quark --bench hash
    cargo bench --quiet -p quark --bench model_forward
    cargo bench --quiet -p quark --bench sample
    cargo bench --quiet -p quark --bench fit_step
    cargo test --release --quiet -p quark --test lib -- --ignored --nocapture score_toxicity::bench_toxicity
