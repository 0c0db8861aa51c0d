# Sourced by the loop's scripts (from the repository root): the task file that a
# name or a path means, its settings loaded into the shell, and the studies' split
# of the train prompts and log line.

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

# split_train PROMPTS DIR: the studies' deterministic split of the train prompts (by
# line): every fifth line, up to 100, into DIR/dev.jsonl, the rest into
# DIR/train.jsonl.
split_train() {
  awk -v train="$2/train.jsonl" -v dev="$2/dev.jsonl" \
    'NR % 5 == 0 && ++d <= 100 { print > dev; next } { print > train }' "$1"
}

# log MESSAGE: MESSAGE on stderr behind the script's name and the minutes since it
# started.
started=$SECONDS
log() { printf '%s [%5.1f min]: %s\n' "$(basename "$0" .sh)" "$(((SECONDS - started) * 10 / 60))e-1" "$*" >&2; }
