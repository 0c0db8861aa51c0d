"""The Quark loop's stages and their flags, described once.

A task file (`pipelines/<task>.env`, `KEY=VALUE` lines) sets the loop's numbers;
this module reads it (as bash's `source` would, for the subset task files use) and
turns it, with one iteration's context (its number, the policy, the files made so
far), into each stage's command line. `scripts/iterate.sh` calls it on the command
line and the Airflow DAG (`pipelines/airflow/quark_dag.py`) imports it, so that a
new option of a program is one edit here and reaches both.

    python3 pipelines/stages.py get TASKFILE KEY            the value of KEY
    python3 pipelines/stages.py words TASKFILE KEY          KEY split as the shell
        splits a command line (SCORER_ARGS, FIT_ARGS), one word a line
    python3 pipelines/stages.py args STAGE TASKFILE NAME=VALUE...
        the program and its arguments for STAGE (sample, score, bin, fit), one a
        line; NAME=VALUE gives the context: it, dir, policy, condition, shard,
        generations, scored (repeatable), previous, pool

Only the standard library: it runs with any Python 3.10+.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import sys
from pathlib import Path

# The keys the stages read from a task file.
REQUIRED_KEYS = (
    "MODEL TRAIN_PROMPTS SCORER PROMPT_SHARDS SAMPLES_PER_PROMPT MAX_NEW_TOKENS "
    "MIN_NEW_TOKENS TOP_P SAMPLE_BATCH QUANTILES ITERATIONS FIT_STEPS BATCH_SIZE "
    "GRAD_ACCUM LR WARMUP_STEPS KL_COEF ENTROPY_COEF UNLIKELIHOOD_COEF DTYPE SEED"
).split()

# The other keys a task file may set (read by the scripts, the Airflow DAG or
# `stage_args`). Any other upper-case key is refused as a likely typo, but for the
# QUARK_* names the task files read from the environment and an `export`ed name;
# lower-case names are free for a file's own variables.
OPTIONAL_KEYS = (
    "SCORER_ARGS FIT_ARGS LR_SCHEDULE EVAL_PROMPTS EVAL_NEUTRAL_PROMPTS EVAL_SAMPLES "
    "EVAL_TOP_P EVAL_MAX_NEW_TOKENS EVAL_GREEDY EVAL_LIMIT EVAL_CURVE_SAMPLES "
    "EVAL_TEXT_PERPLEXITY"
).split()

# Flags whose value is a task-file key, per stage, after the flags that depend on
# the iteration (see `stage_args`). A new option of a program is one line here.
SAMPLE_FLAGS = [
    ("--samples-per-prompt", "SAMPLES_PER_PROMPT"),
    ("--max-new-tokens", "MAX_NEW_TOKENS"),
    ("--min-new-tokens", "MIN_NEW_TOKENS"),
    ("--top-p", "TOP_P"),
    ("--batch-size", "SAMPLE_BATCH"),
    ("--dtype", "DTYPE"),
]
BIN_FLAGS = [
    ("--quantiles", "QUANTILES"),
]
FIT_FLAGS = [
    ("--steps", "FIT_STEPS"),
    ("--batch-size", "BATCH_SIZE"),
    ("--grad-accum", "GRAD_ACCUM"),
    ("--lr", "LR"),
    ("--warmup-steps", "WARMUP_STEPS"),
    ("--kl-coef", "KL_COEF"),
    ("--entropy-coef", "ENTROPY_COEF"),
    ("--unlikelihood-coef", "UNLIKELIHOOD_COEF"),
    ("--seed", "SEED"),
    ("--dtype", "DTYPE"),
]


# ---- the task file -----------------------------------------------------------------


def parse_env(
    text: str,
    environ: dict[str, str],
    source: str = "<env>",
    base: Path | None = None,
    values: dict[str, str] | None = None,
    depth: int = 0,
    origins: dict[str, str] | None = None,
) -> dict[str, str]:
    """Reads `KEY=VALUE` lines the way bash's `source` (with `set -u`) sets them.

    Supports comments, `export`, single and double quotes, backslash escapes and the
    expansions `$NAME`, `${NAME}`, `${NAME:-word}`, `${NAME-word}`, `${NAME:+word}`,
    `${NAME+word}` (nested), looked up in the keys set so far, then `environ`; and
    `source FILE` (or `. FILE`), which reads another task file there, so that a
    variant of a task is its file plus the keys it changes. A relative FILE is
    taken from `base` (default: the working directory), as the scripts, which run
    from the repository root, would find it. Anything else (commands, `$(...)`,
    backquotes) is an error naming the line. `origins`, if given, receives the
    line (`FILE:N`) that last set each key.
    """
    values = {} if values is None else values
    assign = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)")
    include = re.compile(r"\s*(?:source|\.)\s+(.*)")

    def lookup(name: str) -> str | None:
        return values[name] if name in values else environ.get(name)

    for number, line in enumerate(text.splitlines(), 1):
        where = f"{source}:{number}"
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = include.fullmatch(line)
        if m:
            name, end = _word(m.group(1), 0, lookup, where, stop=" \t")
            rest = m.group(1)[end:].strip()
            if not name or (rest and not rest.startswith("#")):
                raise ValueError(f"{where}: `source` takes one file: {stripped}")
            if "/" not in name:
                # (bash would look a bare name up in PATH first)
                raise ValueError(f"{where}: `source` needs a path with a `/`, such as pipelines/{name}")
            path = (base or Path.cwd()) / name
            if depth >= 8:
                raise ValueError(f"{where}: `source` nested more than 8 deep (a cycle?)")
            try:
                included = path.read_text()
            except OSError as e:
                raise ValueError(f"{where}: cannot read {path}: {e.strerror}") from None
            parse_env(included, environ, f"{name} (sourced at {where})", base, values, depth + 1, origins)
            continue
        m = assign.fullmatch(line)
        if not m:
            raise ValueError(f"{where}: not a KEY=VALUE line: {stripped}")
        raw = m.group(2)
        value, end = _word(raw, 0, lookup, where, stop=" \t")
        # bash expands a leading unquoted `~` or `~/` of an assignment to $HOME.
        if raw == "~" or raw.startswith("~/") or raw.startswith("~ ") or raw.startswith("~\t"):
            home = lookup("HOME")
            if home is None:
                raise ValueError(f"{where}: `~` with HOME unset")
            value = home + value[1:]
        rest = m.group(2)[end:].strip()
        if rest and not rest.startswith("#"):
            raise ValueError(f"{where}: unquoted space in the value of {m.group(1)}")
        values[m.group(1)] = value
        # (An exported name is meant for the environment, not the loop.)
        if origins is not None and not re.match(r"export\s", stripped):
            origins[m.group(1)] = where
    return values


def _word(s: str, i: int, lookup, where: str, stop: str) -> tuple[str, int]:
    """Expands the shell word in `s` from `i` to the first unquoted char in `stop`."""
    out: list[str] = []
    while i < len(s) and s[i] not in stop:
        c = s[i]
        if c == "'":
            j = s.find("'", i + 1)
            if j < 0:
                raise ValueError(f"{where}: unterminated single quote")
            out.append(s[i + 1 : j])
            i = j + 1
        elif c == '"':
            i += 1
            while True:
                if i >= len(s):
                    raise ValueError(f"{where}: unterminated double quote")
                c = s[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < len(s) and s[i + 1] in '$`"\\':
                    out.append(s[i + 1])
                    i += 2
                elif c == "$":
                    text, i = _dollar(s, i, lookup, where)
                    out.append(text)
                elif c == "`":
                    raise ValueError(f"{where}: command substitution is not supported")
                else:
                    out.append(c)
                    i += 1
        elif c == "\\":
            out.append(s[i + 1 : i + 2])
            i += 2
        elif c == "$":
            text, i = _dollar(s, i, lookup, where)
            out.append(text)
        elif c in "`;|&<>()":
            raise ValueError(f"{where}: `{c}` is not supported in a task file (plain KEY=VALUE only)")
        else:
            out.append(c)
            i += 1
    return "".join(out), i


def _dollar(s: str, i: int, lookup, where: str) -> tuple[str, int]:
    """Expands the `$...` at `s[i]`; returns the text and the index after it."""
    name = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
    if s.startswith("${", i):
        m = name.match(s, i + 2)
        if not m:
            raise ValueError(f"{where}: unsupported expansion {s[i:]}")
        key, j = m.group(0), m.end()
        value = lookup(key)
        if j < len(s) and s[j] == "}":
            if value is None:
                raise ValueError(f"{where}: {key}: unbound variable")
            return value, j + 1
        op = ":" if s.startswith(":", j) else ""
        j += len(op)
        if j >= len(s) or s[j] not in "-+":
            raise ValueError(f"{where}: unsupported expansion {s[i:]}")
        op += s[j]
        word, j = _word(s, j + 1, lookup, where, stop="}")
        if j >= len(s):
            raise ValueError(f"{where}: unterminated ${{")
        unset_or_empty = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return (word if unset_or_empty else value), j + 1
        return ("" if unset_or_empty else word), j + 1
    m = name.match(s, i + 1)
    if m:
        value = lookup(m.group(0))
        if value is None:
            raise ValueError(f"{where}: {m.group(0)}: unbound variable")
        return value, m.end()
    if s.startswith("$(", i):
        raise ValueError(f"{where}: command substitution is not supported")
    return "$", i + 1


def task_config_path(root: Path, name: str) -> Path:
    """The .env file of a task: NAME as a path (from the root) if that file exists,
    else pipelines/NAME.env."""
    given = root / name
    if given.is_file():
        return given
    named = root / "pipelines" / f"{name}.env"
    if named.is_file():
        return named
    raise FileNotFoundError(f"no task config: neither {given} nor {named} exists")


def read_task(path: Path, environ: dict[str, str], root: Path | None = None) -> dict[str, str]:
    """A task file's settings, checked for the keys the stages need; a file it
    sources is found from `root` (default: the working directory)."""
    origins: dict[str, str] = {}
    config = parse_env(path.read_text(), environ, str(path), base=root, origins=origins)
    # (A key a flag table reads is known too: a new option stays one edit.)
    known = REQUIRED_KEYS + OPTIONAL_KEYS + [k for _, k in SAMPLE_FLAGS + BIN_FLAGS + FIT_FLAGS]
    for key, where in origins.items():
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", key) and key not in known and not key.startswith("QUARK_"):
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"{where}: unknown key {key}{hint}; a name in lower case is free for your own use")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    if not config["TRAIN_PROMPTS"]:
        raise ValueError(f"{path}: the task needs TRAIN_PROMPTS")
    for key in ("PROMPT_SHARDS", "ITERATIONS", "SEED", "FIT_STEPS"):
        if not re.fullmatch(r"\d+", config[key]):
            raise ValueError(f"{path}: {key}={config[key]!r} is not a non-negative integer")
    if int(config["PROMPT_SHARDS"]) < 1:
        raise ValueError(f"{path}: PROMPT_SHARDS must be at least 1")
    return config


def load_task(root: Path, name: str, environ: dict[str, str]) -> dict[str, str]:
    """The settings of the task NAME (a name in pipelines/ or a path)."""
    return read_task(task_config_path(root, name), environ, root)


# ---- the stages --------------------------------------------------------------------


def shards(it: int, prompt_shards: int, workers: int) -> list[str]:
    """The `--shard I/N` of each of `workers` samplers of iteration `it`: together,
    the slice it % PROMPT_SHARDS of the train prompts."""
    n = prompt_shards * workers
    return [f"{(it % prompt_shards) * workers + w}/{n}" for w in range(workers)]


def _flags(table: list[tuple[str, str]], c: dict[str, str]) -> list[str]:
    return [part for flag, key in table for part in (flag, c[key])]


def stage_args(stage: str, c: dict[str, str], ctx: dict) -> list[str]:
    """The program and arguments of `stage` for task settings `c` and the
    iteration's context `ctx` (it, dir; policy and condition for sample and fit;
    shard, else the iteration's whole slice; generations for score; scored, a list,
    and previous for bin; pool for fit)."""
    it = int(ctx["it"])
    out = f"{ctx['dir']}/"
    if stage == "sample":
        shard = ctx.get("shard") or shards(it, int(c["PROMPT_SHARDS"]), 1)[0]
        return [
            "quark-sample", "--model", ctx["policy"], "--prompts", c["TRAIN_PROMPTS"], "--out", out,
            "--condition", ctx["condition"], "--iteration", str(it), "--seed", str(int(c["SEED"]) + it),
            "--shard", shard, *_flags(SAMPLE_FLAGS, c),
        ]  # fmt: skip
    if stage == "score":
        return [
            "quark-score", "--in", ctx["generations"], "--scorer", c["SCORER"],
            *shlex.split(c.get("SCORER_ARGS", "")), "--out", out,
        ]  # fmt: skip
    if stage == "bin":
        previous = ["--pool", ctx["previous"]] if ctx.get("previous") else []
        return ["quark-bin", "--in", *ctx["scored"], *previous, *_flags(BIN_FLAGS, c), "--out", out]
    if stage == "fit":
        # The schedule spans the whole run, so N fits of it train as one long fit:
        # linear decays to 0 over ITERATIONS fits (later ones learn nothing), constant
        # holds the peak after the warm-up (any number of iterations keeps learning).
        schedule = c.get("LR_SCHEDULE", "linear")
        if schedule == "linear":
            total = int(c["FIT_STEPS"]) * int(c["ITERATIONS"])
            plan = ["--total-steps", str(total)]
        elif schedule == "constant":
            plan = ["--schedule", "constant"]
        else:
            raise ValueError(f"LR_SCHEDULE={schedule}: linear or constant")
        return [
            "quark-fit", "--pool", ctx["pool"], "--policy", ctx["policy"], "--reference", c["MODEL"],
            "--out", f"{ctx['dir']}/policy-{it}", *plan, "--iteration", str(it),
            *_flags(FIT_FLAGS, c), *shlex.split(c.get("FIT_ARGS", "")),
        ]  # fmt: skip
    raise ValueError(f"unknown stage {stage!r} (sample, score, bin, fit)")


# ---- the command line (scripts/iterate.sh) -----------------------------------------


def main(argv: list[str]) -> int:
    try:
        if len(argv) == 3 and argv[0] == "get":
            config = read_task(Path(argv[1]), dict(os.environ))
            print(config[argv[2]] if argv[2] in config else "")
            return 0
        if len(argv) == 3 and argv[0] == "words":
            config = read_task(Path(argv[1]), dict(os.environ))
            for word in shlex.split(config.get(argv[2], "")):
                print(word)
            return 0
        if len(argv) >= 3 and argv[0] == "args":
            config = read_task(Path(argv[2]), dict(os.environ))
            ctx: dict = {"scored": []}
            for pair in argv[3:]:
                name, _, value = pair.partition("=")
                if name == "scored":
                    ctx["scored"].append(value)
                else:
                    ctx[name] = value
            print("\n".join(stage_args(argv[1], config, ctx)))
            return 0
    except (OSError, ValueError, KeyError) as e:
        print(f"stages: error: {e}", file=sys.stderr)
        return 2
    print(__doc__.split("\n\n")[2], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
