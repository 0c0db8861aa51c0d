#!/usr/bin/env bash
# Loads pipelines/airflow/quark_dag.py in a real Airflow and, given a task and a run,
# runs one iteration of it with `airflow dags test`.
#
# Usage: tests/python/airflow_dag_test.sh [TASK RUN [WORKERS]]
#   no arguments  the DAG's checks (tests/python/test_airflow_dag.py): it imports with
#                 no errors, its task graph and params, the .env parser against bash,
#                 the shard arithmetic against iterate.sh's slice
#   TASK RUN      then `airflow dags test quark_iteration` on that task (.env path or a
#                 name in pipelines/) and run (a name under data/runs/ or a folder),
#                 with WORKERS sample/score workers (default 2), and checks that the
#                 run's manifest gained one iteration: WORKERS sample and score files,
#                 one pool, one fit. The quark programs are taken from QUARK_BIN_DIR
#                 (default target/release of this checkout, else PATH).
# Environment: QUARK_AIRFLOW_VENV (default target/airflow-venv; created and reused),
#   QUARK_AIRFLOW_VERSION (default 3.3.2), PYTHON (the interpreter to build the venv
#   from, >= 3.10; default python3).
# Exit status: 0 passed, 77 skipped (no Airflow could be installed: the reason is
# printed), anything else failed.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
venv=${QUARK_AIRFLOW_VENV:-$root/target/airflow-venv}
version=${QUARK_AIRFLOW_VERSION:-3.3.2}
python=${PYTHON:-python3}
skip() {
  echo "airflow_dag_test: skipped: $*" >&2
  exit 77
}
say() { echo "airflow_dag_test: $*" >&2; }

# ---- the venv: built once, reused while it holds the pinned version ---------------
has_airflow() { "$venv/bin/python" -c "import sys, airflow; sys.exit(airflow.__version__ != '$version')" 2>/dev/null; }
if ! has_airflow; then
  mkdir -p "$(dirname "$venv")"
  # One installer at a time (two tests may start together); the second reuses it.
  exec 9>"$venv.lock"
  flock 9
  if ! has_airflow; then
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null ||
      skip "Airflow $version needs Python >= 3.10; $python is $("$python" --version 2>/dev/null || echo missing) (set PYTHON)"
    say "installing apache-airflow==$version into $venv"
    start=$SECONDS
    log=$(mktemp)
    rm -rf "$venv"
    if ! "$python" -m venv "$venv" >"$log" 2>&1; then
      tail -n 3 "$log" | cut -c1-300 >&2
      rm -rf "$venv"
      skip "cannot create a venv with $python"
    fi
    # Airflow's constraint files live outside PyPI; the pin alone installs cleanly here.
    if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "apache-airflow==$version" >"$log" 2>&1; then
      tail -n 3 "$log" | cut -c1-300 >&2
      rm -rf "$venv"
      skip "pip could not install apache-airflow==$version (no PyPI?)"
    fi
    rm -f "$log"
    say "installed apache-airflow $version in $((SECONDS - start)) s"
  fi
  flock -u 9
fi

# ---- a throw-away Airflow home ------------------------------------------------------
AIRFLOW_HOME=$(mktemp -d)
export AIRFLOW_HOME
trap 'rm -rf "$AIRFLOW_HOME"' EXIT
export AIRFLOW__CORE__DAGS_FOLDER=$root/pipelines/airflow
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__LOGGING__LOGGING_LEVEL=${AIRFLOW__LOGGING__LOGGING_LEVEL:-WARNING}

say "DAG checks (Airflow $version)"
"$venv/bin/python" "$root/tests/python/test_airflow_dag.py"

[ $# -ge 2 ] || exit 0
task=$1
run=$2
workers=${3:-2}
# The DAG takes relative paths from the repository root: make the caller's absolute.
[ -e "$task" ] && task=$(realpath "$task")
case $run in */*) run=$(realpath -m "$run") ;; esac
case $run in */*) dir=$run ;; *) dir=$root/data/runs/$run ;; esac
manifest=$dir/manifest.tsv
fits() { [ -f "$manifest" ] && awk -F'\t' '$2 == "fit" { n++ } END { print n + 0 }' "$manifest" || echo 0; }
before=$(fits)

conf=$("$venv/bin/python" -c 'import json, sys; print(json.dumps({"task": sys.argv[1], "run": sys.argv[2], "workers": int(sys.argv[3]), "root": sys.argv[4], "bin_dir": sys.argv[5]}))' \
  "$task" "$run" "$workers" "$root" "${QUARK_BIN_DIR:-$root/target/release}")
say "airflow dags test quark_iteration -c '$conf'"
"$venv/bin/python" -m airflow db migrate >"$AIRFLOW_HOME/migrate.log" 2>&1 || {
  tail -n 20 "$AIRFLOW_HOME/migrate.log" >&2
  exit 1
}
if ! "$venv/bin/python" -m airflow dags test quark_iteration -c "$conf" >"$AIRFLOW_HOME/test.log" 2>&1; then
  grep -E "ERROR|Error|error" "$AIRFLOW_HOME/test.log" | tail -n 20 >&2
  say "FAILED: airflow dags test (log above)"
  exit 1
fi

after=$(fits)
if [ "$after" -ne $((before + 1)) ]; then
  if grep -q "has done its" "$AIRFLOW_HOME/test.log"; then
    say "the run had done all its iterations before: nothing to check (use a fresh run)"
    exit 1
  fi
  say "FAILED: $manifest has $after fits, expected $((before + 1))"
  exit 1
fi
it=$before
count() { awk -F'\t' -v i="$it" -v s="$1" '$1 == i && $2 == s { n++ } END { print n + 0 }' "$manifest"; }
for stage in sample:$workers score:$workers bin:1 fit:1; do
  got=$(count "${stage%%:*}")
  if [ "$got" -ne "${stage#*:}" ]; then
    say "FAILED: iteration $it has $got ${stage%%:*} lines in $manifest, expected ${stage#*:}"
    exit 1
  fi
done
while IFS=$'\t' read -r i _ path; do
  [ "$i" = "$it" ] || continue
  case $path in /*) p=$path ;; *) p=$root/$path ;; esac
  [ -e "$p" ] || {
    say "FAILED: $manifest names $path, which does not exist"
    exit 1
  }
done < <(tail -n +2 "$manifest")
say "passed: iteration $it of $run ran through Airflow with $workers workers ($manifest)"
