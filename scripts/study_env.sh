# Sourced by the studies (study.sh, task_study.sh) after task_env.sh: their split
# of the train prompts and their log line.

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
