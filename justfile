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
# Run one Quark iteration of the current task (sample, score, bin, fit).
iterate: setup
    @echo "iterate: the loop's stages are added by the sample, score, bin and fit issues" >&2
    @exit 1

# ---- checks ------------------------------------------------------------------
# Run every test (release mode: tests run models).
test: setup
    cargo test --release --workspace

# Formatting and lints, as CI checks them.
lint: setup
    cargo fmt --all -- --check
    cargo clippy --release --workspace --all-targets --quiet -- -D warnings

# Exactly what CI runs.
ready: lint test

# Benchmarks against the Python baselines, each printing its ratio.
bench: setup
    cargo test --release -p quark --test score_toxicity -- --ignored --nocapture bench_toxicity
