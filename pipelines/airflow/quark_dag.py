"""One Quark iteration per DAG run, with sampling and scoring fanned out over workers.

The same stages as `scripts/iterate.sh` (sample -> score -> bin -> fit), run by the
same programs with the same flags (both take each stage's command line from
`pipelines/stages.py`), reading the same task configuration
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
import importlib.util
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



def _load_stages():
    """pipelines/stages.py (the stages' command lines and the task files, which
    scripts/iterate.sh reads too), by its path in the checkout: QUARK_ROOT when set
    (a DAG file copied into Airflow's dags folder), else two folders above this file."""
    root = Path(os.environ.get("QUARK_ROOT") or DEFAULT_ROOT)
    spec = importlib.util.spec_from_file_location("quark_stages", root / "pipelines" / "stages.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_stages = _load_stages()
REQUIRED_KEYS = _stages.REQUIRED_KEYS
load_task = _stages.load_task
parse_env = _stages.parse_env
shards = _stages.shards
stage_args = _stages.stage_args
task_config_path = _stages.task_config_path


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

    def run_stage(p: dict, stage: str, **ctx) -> str:
        argv = stage_args(stage, p["config"], {"it": p["it"], "dir": p["dir"], **ctx})
        return run_program(p["bin_dir"], p["root"], argv[0], argv[1:])

    @task
    def sample(p: dict, shard: str) -> str:
        return run_stage(p, "sample", policy=p["policy"], condition=p["condition"], shard=shard)

    @task
    def score(p: dict, generations: str) -> str:
        return run_stage(p, "score", generations=generations)

    @task(task_id="bin")
    def bin_pool(p: dict, scored: list[str]) -> str:
        # A mapped task's results arrive in map-index order, i.e. shard order.
        return run_stage(p, "bin", scored=list(scored), previous=p["previous"])

    @task
    def fit(p: dict, generations: list[str], scored: list[str], pool: str) -> str:
        it = p["it"]
        checkpoint = run_stage(p, "fit", policy=p["policy"], pool=pool)
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
