# Sourced by the loop's scripts (from the repository root): the task file that a
# name or a path means, and its settings loaded into the shell.

# task_file TASK: TASK when it is a file, else pipelines/TASK.env; exit 2 (naming
# the calling script) when neither exists.
task_file() {
  local config=$1
  [ -f "$config" ] || config=pipelines/$1.env
  [ -f "$config" ] || { echo "$(basename "$0" .sh): no task config $config" >&2; exit 2; }
  echo "$config"
}

# load_task FILE: its settings as shell variables. stages.py reads it first and
# refuses a mistyped key, naming its line, where bash would ignore it.
load_task() {
  python3 pipelines/stages.py get "$1" MODEL >/dev/null
  # shellcheck disable=SC1090
  source "$1"
}
