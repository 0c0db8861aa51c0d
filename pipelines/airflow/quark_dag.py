"""One Quark iteration per DAG run, with sampling and scoring fanned out over workers.

The same stages as `scripts/iterate.sh` (sample -> score -> bin -> fit), run by the
same programs with the same flags, reading the same task configuration
(`pipelines/<task>.env`) and keeping the same run folder and manifest
(`data/runs/<run>/manifest.tsv`, lines `iteration<TAB>stage<TAB>path`), so a run can
be moved between `just iterate` and Airflow at any iteration boundary.

    plan -> shards -> sample[w] (w in 0..W) -> score[w] -> bin -> fit

* `plan` reads the task's .env and the manifest: the iteration `it` (the number of
  fits recorded), the policy (the task's MODEL at it=0, else the newest fit), the
  condition (none at it=0, else quantile 0) and the previous pool.
* `sample` is mapped over W workers: worker w samples the slice
  `((it % PROMPT_SHARDS) * W + w) / (PROMPT_SHARDS * W)` of the train prompts; the W
  slices together are exactly iterate.sh's slice `(it % PROMPT_SHARDS)/PROMPT_SHARDS`.
* `score` is mapped over the generation files; `bin` joins every scored file (and the
  previous pool) into the new pool; `fit` trains and then records the iteration's
  files in the manifest (every shard file, each line once).

Every output is content-hashed by the programs, so a retried or re-run task finds its
file already written and returns at once; a DAG run that failed half-way is simply
triggered again. Nothing but the paths travels through XCom: the state is in files.

Params (trigger with `-c '{"task": "toxicity", "run": "tox", "workers": 4}'`):
  task     a task name in pipelines/ or a path to a .env file
  run      the run's name (its files go to data/runs/<run>/) or a folder (has a /)
  workers  W, the number of sample/score workers
  root     the repository root (default: two folders above this file); relative
           paths in the .env and the run folder are taken from it
  bin_dir  where quark-sample etc. are (default <root>/target/release; else PATH)
  env      variables the .env file sees as its environment (e.g. QUARK_PROMPTS)
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

try:  # Airflow 3
    from airflow.sdk import Param, dag, task
except ImportError:  # Airflow 2.x
    from airflow.decorators import dag, task
    from airflow.models.param import Param

try:
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
except ImportError:
    from airflow.exceptions import AirflowFailException, AirflowSkipException

log = logging.getLogger(__name__)

DAG_ID = "quark_iteration"
DEFAULT_ROOT = Path(__file__).resolve().parent.parent.parent
MANIFEST_HEADER = "iteration\tstage\tpath\n"
# The keys iterate.sh reads from a task's .env.
REQUIRED_KEYS = (
    "MODEL TRAIN_PROMPTS SCORER PROMPT_SHARDS SAMPLES_PER_PROMPT MAX_NEW_TOKENS "
    "MIN_NEW_TOKENS TOP_P SAMPLE_BATCH QUANTILES ITERATIONS FIT_STEPS BATCH_SIZE "
    "GRAD_ACCUM LR WARMUP_STEPS KL_COEF ENTROPY_COEF UNLIKELIHOOD_COEF DTYPE SEED"
).split()


# ---- the task configuration ------------------------------------------------------


def parse_env(text: str, environ: dict[str, str], source: str = "<env>") -> dict[str, str]:
    """Reads `KEY=VALUE` lines the way bash's `source` (with `set -u`) sets them.

    Supports comments, `export`, single and double quotes, backslash escapes and the
    expansions `$NAME`, `${NAME}`, `${NAME:-word}`, `${NAME-word}`, `${NAME:+word}`,
    `${NAME+word}` (nested), looked up in the keys set so far, then `environ`.
    Anything else (commands, `$(...)`, backquotes) is an error naming the line.
    """
    values: dict[str, str] = {}
    assign = re.compile(r"\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)")

    def lookup(name: str) -> str | None:
        return values[name] if name in values else environ.get(name)

    for number, line in enumerate(text.splitlines(), 1):
        where = f"{source}:{number}"
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = assign.fullmatch(line)
        if not m:
            raise ValueError(f"{where}: not a KEY=VALUE line: {stripped}")
        value, end = _word(m.group(2), 0, lookup, where, stop=" \t")
        rest = m.group(2)[end:].strip()
        if rest and not rest.startswith("#"):
            raise ValueError(f"{where}: unquoted space in the value of {m.group(1)}")
        values[m.group(1)] = value
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
    """The .env file of a task, as iterate.sh finds it: NAME as a path (from the
    root) if that file exists, else pipelines/NAME.env."""
    given = root / name
    if given.is_file():
        return given
    named = root / "pipelines" / f"{name}.env"
    if named.is_file():
        return named
    raise FileNotFoundError(f"no task config: neither {given} nor {named} exists")


def load_task(root: Path, name: str, environ: dict[str, str]) -> dict[str, str]:
    """The task's settings, checked for the keys the stages need."""
    path = task_config_path(root, name)
    config = parse_env(path.read_text(), environ, str(path))
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise ValueError(f"{path}: missing {', '.join(missing)}")
    if not config["TRAIN_PROMPTS"]:
        raise ValueError(f"{path}: the task {name} needs TRAIN_PROMPTS")
    for key in ("PROMPT_SHARDS", "ITERATIONS", "SEED", "FIT_STEPS"):
        if not re.fullmatch(r"\d+", config[key]):
            raise ValueError(f"{path}: {key}={config[key]!r} is not a non-negative integer")
    if int(config["PROMPT_SHARDS"]) < 1:
        raise ValueError(f"{path}: PROMPT_SHARDS must be at least 1")
    return config


# ---- the run folder and its manifest ---------------------------------------------


def run_dir(run: str) -> str:
    """The run's folder as iterate.sh names it (relative to the root unless absolute)."""
    return run if "/" in run else f"data/runs/{run}"


def read_manifest(path: Path) -> list[tuple[int, str, str]]:
    """The (iteration, stage, path) lines of a manifest, in order."""
    rows = []
    for line in path.read_text().splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) == 3 and parts[0].isdigit():
            rows.append((int(parts[0]), parts[1], parts[2]))
    return rows


def record(path: Path, lines: list[tuple[int, str, str]]) -> None:
    """Appends each (iteration, stage, path) line that the manifest lacks, once."""
    have = set(path.read_text().splitlines())
    new = []
    for it, stage, out in lines:
        line = f"{it}\t{stage}\t{out}"
        if line not in have:
            have.add(line)
            new.append(line + "\n")
    if new:
        with path.open("a") as f:
            f.write("".join(new))


def shards(it: int, prompt_shards: int, workers: int) -> list[str]:
    """The `--shard I/N` of each worker: together, iterate.sh's slice it % S of S."""
    n = prompt_shards * workers
    return [f"{(it % prompt_shards) * workers + w}/{n}" for w in range(workers)]


# ---- running a program -----------------------------------------------------------


def run_program(bin_dir: str, root: str, name: str, args: list[str]) -> str:
    """Runs a quark program from the root and returns the one path it printed.

    Its stderr goes to the task log line by line; a non-zero exit raises with the
    program's last stderr line (its one-line error).
    """
    exe = Path(bin_dir) / name
    argv = [str(exe) if exe.is_file() else name, *args]
    log.info("%s", shlex.join(argv))
    stdout: list[str] = []
    last = ""
    pipes = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    with subprocess.Popen(argv, cwd=root, text=True, **pipes) as proc:
        # stdout (the paths) is drained on a thread so neither pipe can fill and block.
        reader = threading.Thread(target=lambda: stdout.extend(proc.stdout))
        reader.start()
        for line in proc.stderr:
            line = line.rstrip("\n")
            if line.strip():
                last = line
                log.info("%s: %s", name, line)
        reader.join()
    code = proc.returncode
    if code != 0:
        raise RuntimeError(f"{name} exited with {code}: {last or '(no message)'}")
    paths = [p.strip() for p in stdout if p.strip()]
    if len(paths) != 1:
        raise RuntimeError(f"{name} printed {len(paths)} paths, expected one: {paths}")
    return paths[0]


# ---- the DAG ---------------------------------------------------------------------


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=datetime(2024, 1, 1, tzinfo=timezone.utc),
    catchup=False,
    # Two concurrent runs of one run folder would both plan the same iteration.
    max_active_runs=1,
    default_args={"retries": 1, "retry_delay": timedelta(seconds=30)},
    params={
        "task": Param("toxicity", type="string", description="a task in pipelines/ or a path to a .env file"),
        "run": Param(
            "toxicity", type="string", description="the run: data/runs/RUN/, or a folder if it has a /"
        ),
        "workers": Param(2, type="integer", minimum=1, description="sample/score workers W"),
        "root": Param(
            "", type="string", description="repository root (empty: two folders above the DAG file)"
        ),
        "bin_dir": Param(
            "", type="string", description="folder of the quark programs (empty: ROOT/target/release)"
        ),
        "env": Param({}, type="object", description="variables the .env file sees (e.g. QUARK_PROMPTS)"),
    },
    tags=["quark"],
    doc_md=__doc__,
)
def quark_iteration():
    @task
    def plan(**context) -> dict:
        params = context["params"]
        root = Path(params["root"] or DEFAULT_ROOT).resolve()
        bin_dir = params["bin_dir"] or str(root / "target" / "release")
        workers = int(params["workers"])
        if workers < 1:
            raise AirflowFailException(f"workers={workers}: needs at least 1")
        try:
            config = load_task(root, params["task"], {**os.environ, **params["env"]})
        except (OSError, ValueError) as e:
            # A wrong configuration stays wrong: fail without retrying.
            raise AirflowFailException(str(e)) from e
        dir_ = run_dir(params["run"])
        (root / dir_).mkdir(parents=True, exist_ok=True)
        manifest = root / dir_ / "manifest.tsv"
        if not manifest.exists():
            manifest.write_text(MANIFEST_HEADER)
        rows = read_manifest(manifest)
        fits = [path for _, stage, path in rows if stage == "fit"]
        it = len(fits)
        iterations = int(config["ITERATIONS"])
        if it >= iterations:
            raise AirflowSkipException(
                f"run {params['run']} has done its {iterations} iterations (see {manifest})"
            )
        previous = [path for i, stage, path in rows if stage == "bin" and i < it]
        log.info("run %s, iteration %d", params["run"], it)
        return {
            "root": str(root),
            "bin_dir": bin_dir,
            "dir": dir_,
            "manifest": str(manifest),
            "it": it,
            "policy": config["MODEL"] if it == 0 else fits[-1],
            "condition": "none" if it == 0 else "0",
            "previous": previous[-1] if previous else "",
            "shards": shards(it, int(config["PROMPT_SHARDS"]), workers),
            "config": config,
        }

    @task(task_id="shards")
    def shard_list(p: dict) -> list[str]:
        # A mapped task expands over a whole return value, not over one key of it.
        return p["shards"]

    @task
    def sample(p: dict, shard: str) -> str:
        c, it = p["config"], p["it"]
        return run_program(p["bin_dir"], p["root"], "quark-sample", [
            "--model", p["policy"], "--prompts", c["TRAIN_PROMPTS"], "--out", f"{p['dir']}/",
            "--condition", p["condition"], "--iteration", str(it), "--seed", str(int(c["SEED"]) + it),
            "--shard", shard, "--samples-per-prompt", c["SAMPLES_PER_PROMPT"],
            "--max-new-tokens", c["MAX_NEW_TOKENS"], "--min-new-tokens", c["MIN_NEW_TOKENS"],
            "--top-p", c["TOP_P"],
            "--batch-size", c["SAMPLE_BATCH"], "--dtype", c["DTYPE"],
        ])  # fmt: skip

    @task
    def score(p: dict, generations: str) -> str:
        c = p["config"]
        return run_program(p["bin_dir"], p["root"], "quark-score", [
            "--in", generations, "--scorer", c["SCORER"], *shlex.split(c.get("SCORER_ARGS", "")),
            "--out", f"{p['dir']}/",
        ])  # fmt: skip

    @task(task_id="bin")
    def bin_pool(p: dict, scored: list[str]) -> str:
        # A mapped task's results arrive in map-index order, i.e. shard order.
        pool = ["--pool", p["previous"]] if p["previous"] else []
        return run_program(p["bin_dir"], p["root"], "quark-bin", [
            "--in", *list(scored), *pool, "--quantiles", p["config"]["QUANTILES"], "--out", f"{p['dir']}/",
        ])  # fmt: skip

    @task
    def fit(p: dict, generations: list[str], scored: list[str], pool: str) -> str:
        c, it = p["config"], p["it"]
        total = int(c["FIT_STEPS"]) * int(c["ITERATIONS"])
        checkpoint = run_program(p["bin_dir"], p["root"], "quark-fit", [
            "--pool", pool, "--policy", p["policy"], "--reference", c["MODEL"],
            "--out", f"{p['dir']}/policy-{it}", "--steps", c["FIT_STEPS"], "--total-steps", str(total),
            "--batch-size", c["BATCH_SIZE"], "--grad-accum", c["GRAD_ACCUM"], "--lr", c["LR"],
            "--warmup-steps", c["WARMUP_STEPS"], "--kl-coef", c["KL_COEF"],
            "--entropy-coef", c["ENTROPY_COEF"],
            "--unlikelihood-coef", c["UNLIKELIHOOD_COEF"], "--seed", c["SEED"], "--iteration", str(it),
            "--dtype", c["DTYPE"], *shlex.split(c.get("FIT_ARGS", "")),
        ])  # fmt: skip
        # Recorded only once the fit exists: the fit lines count the iterations done.
        record(Path(p["manifest"]), [
            *[(it, "sample", g) for g in generations],
            *[(it, "score", s) for s in scored],
            (it, "bin", pool),
            (it, "fit", checkpoint),
        ])  # fmt: skip
        return checkpoint

    p = plan()
    generations = sample.partial(p=p).expand(shard=shard_list(p))
    scored = score.partial(p=p).expand(generations=generations)
    pool = bin_pool(p, scored)
    fit(p, generations, scored, pool)


quark_iteration()
