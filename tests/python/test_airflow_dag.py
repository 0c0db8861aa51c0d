"""Checks of pipelines/airflow/quark_dag.py that need Airflow but no quark program.

Run with the Airflow venv's python (tests/python/airflow_dag_test.sh does):
  python tests/python/test_airflow_dag.py
The task-file reader of pipelines/stages.py (which iterate.sh and the DAG share) is
checked against bash itself (what eval.sh uses), the shard arithmetic against
iterate.sh's slice, the DAG against Airflow's own DagBag, and one new flag in
stages.py against both iterate.sh's and the DAG's commands.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import tempfile
import unittest
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
DAG_FILE = ROOT / "pipelines" / "airflow" / "quark_dag.py"

spec = importlib.util.spec_from_file_location("quark_dag", DAG_FILE)
quark_dag = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quark_dag)


def bash_source(path: Path, keys: list[str], environ: dict[str, str], cwd: Path = ROOT) -> dict[str, str]:
    """The values bash gives `keys` after `set -u; source path` in `cwd` (as eval.sh
    does from the repository root)."""
    script = 'set -eu; source "$1"; shift; for k; do printf "%s\\0" "${!k}"; done'
    out = subprocess.run(
        ["bash", "-c", script, "bash", str(path), *keys],
        env={"PATH": os.environ["PATH"], **environ},
        cwd=cwd,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return dict(zip(keys, out.split("\0")[:-1], strict=True))


class ParseEnv(unittest.TestCase):
    def assert_like_bash(self, path: Path, environ: dict[str, str]) -> dict[str, str]:
        ours = quark_dag.parse_env(path.read_text(), environ, str(path), base=ROOT)
        self.assertEqual(ours, bash_source(path, list(ours), environ), path)
        return ours

    def test_the_shipped_task_files_read_as_bash_reads_them(self):
        files = sorted((ROOT / "pipelines").glob("*.env"))
        self.assertTrue(files, "no pipelines/*.env")
        for path in files:
            for environ in (
                {},
                {"QUARK_PROMPTS": "a b.jsonl", "QUARK_EVAL_PROMPTS": "e.jsonl"},
                {"QUARK_PROMPTS": ""},
            ):
                config = self.assert_like_bash(path, environ)
                for key in quark_dag.REQUIRED_KEYS:
                    self.assertIn(key, config, path)

    def test_quotes_escapes_and_expansions_read_as_bash_reads_them(self):
        text = "\n".join(
            [
                "# a comment",
                "",
                "A=plain",
                "export B='single $A \"q\"'",
                'C="double $A ${A} \\$ \\" \\\\ end"',
                "D=${UNSET:-fallback}",
                "E=${A:-unused}",
                'F="${EMPTY:-${A:-x}} and ${EMPTY-kept}"',
                "G=${A:+set}${UNSET:+never}",
                "H=  # only a comment",
                "I=a\\ b # trailing comment",
                "J=mixed'single'\"double\"$A",
                "K=${UNSET:-a b}",
                "L=",
                "M=~/models/x",
                "N=~",
            ]
        )
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "t.env"
            path.write_text(text + "\n")
            config = self.assert_like_bash(path, {"EMPTY": "", "HOME": "/home/test"})
        self.assertEqual(config["F"], "plain and ")
        self.assertEqual(config["K"], "a b")
        self.assertEqual(config["M"], "/home/test/models/x")

    def test_a_variant_sources_its_task_and_changes_keys_as_bash_does(self):
        with tempfile.TemporaryDirectory() as d:
            root = Path(d)
            (root / "tasks").mkdir()
            (root / "tasks" / "base.env").write_text("A=1\nB=${B_IN:-two}\nC=$A-three\n")
            variant = root / "tasks" / "variant.env"
            variant.write_text('# a variant\nA=0\nsource "tasks/base.env"  # the task\nB=changed\n. tasks/base.env\nD=$B\n')
            for environ in ({}, {"B_IN": "from env"}):
                ours = quark_dag.parse_env(variant.read_text(), environ, str(variant), base=root)
                self.assertEqual(ours, bash_source(variant, list(ours), environ, cwd=root))
            self.assertEqual(ours, {"A": "1", "B": "from env", "C": "1-three", "D": "from env"})
            # What the reader refuses names the line.
            for line, why in [
                ("source tasks/missing.env", "cannot read"),
                ("source base.env", "a path with a `/`"),
                ("source tasks/base.env tasks/base.env", "one file"),
                ("source tasks/loop.env", "nested more than 8 deep"),
            ]:
                (root / "tasks" / "loop.env").write_text("source tasks/loop.env\n")
                with self.assertRaises(ValueError, msg=line) as cm:
                    quark_dag.parse_env(f"OK=1\n{line}\n", {}, "t.env", base=root)
                self.assertIn("t.env:2", str(cm.exception))
                self.assertIn(why, str(cm.exception))

    def test_a_mistyped_key_is_refused_naming_its_line_and_the_key_meant(self):
        with tempfile.TemporaryDirectory() as d:
            task = Path(d) / "variant.env"
            base = f"source {ROOT}/pipelines/repetition.env\n"
            # Lower-case names are the file's own; the optional keys, the QUARK_* names
            # the task files read and an exported name pass.
            task.write_text(
                "QUARK_PROMPTS=mine.jsonl\nexport OMP_NUM_THREADS=2\n"
                + base
                + "mine=0.1\nKL_COEF=$mine\nEVAL_LIMIT=10\nLR_SCHEDULE=constant\n"
            )
            self.assertEqual(quark_dag.load_task(ROOT, str(task), {})["KL_COEF"], "0.1")
            for typo, meant in [("KL_COEFF", " (did you mean KL_COEF?)"), ("MY_SETTING", ";")]:
                task.write_text(base + f"{typo}=0.1\n")
                with self.assertRaises(ValueError, msg=typo) as cm:
                    quark_dag.load_task(ROOT, str(task), {})
                self.assertIn(f"variant.env:2: unknown key {typo}{meant}", str(cm.exception))
            # In a sourced file, the error names that file's line.
            inner = Path(d) / "inner.env"
            inner.write_text("OK_KEY_TYPO=1\n")
            task.write_text(base + f"source {inner}\n")
            with self.assertRaises(ValueError) as cm:
                quark_dag.load_task(ROOT, str(task), {})
            self.assertIn(f"{inner} (sourced at {task}:2):1: unknown key OK_KEY_TYPO", str(cm.exception))

    def test_what_bash_would_run_or_refuse_is_an_error_naming_the_line(self):
        for line in [
            "A=$(date)",
            "A=`date`",
            "A=x; rm -rf /",
            "A=$UNSET",
            "A=${UNSET}",
            "A='open",
            "A=a b",
            "not an assignment",
        ]:
            with self.assertRaises(ValueError, msg=line) as cm:
                quark_dag.parse_env(f"OK=1\n{line}\n", {}, "t.env")
            self.assertIn("t.env:2", str(cm.exception))


class Plan(unittest.TestCase):
    def test_worker_shards_cover_exactly_the_iterate_slice(self):
        # quark-sample's --shard I/N takes prompts [len*I/N, len*(I+1)/N).
        def rows(length, i, n):
            return list(range(length * i // n, length * (i + 1) // n))

        for length in range(0, 41):
            for prompt_shards in range(1, 5):
                for workers in range(1, 6):
                    for it in range(0, 6):
                        want = rows(length, it % prompt_shards, prompt_shards)
                        got = []
                        for shard in quark_dag.shards(it, prompt_shards, workers):
                            i, n = map(int, shard.split("/"))
                            self.assertLess(i, n)
                            got += rows(length, i, n)
                        self.assertEqual(got, want, (length, prompt_shards, workers, it))

    def test_manifest_lines_are_recorded_once_in_order(self):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "manifest.tsv"
            path.write_text(quark_dag.MANIFEST_HEADER)
            lines = [(0, "sample", "a"), (0, "sample", "b"), (0, "fit", "p0")]
            quark_dag.record(path, lines)
            quark_dag.record(path, lines + [(1, "fit", "p1")])
            self.assertEqual(quark_dag.read_manifest(path), lines + [(1, "fit", "p1")])
            self.assertEqual(path.read_text().splitlines()[0], "iteration\tstage\tpath")

    def test_task_and_run_names_resolve_as_in_iterate_sh(self):
        self.assertEqual(quark_dag.task_config_path(ROOT, "toxicity"), ROOT / "pipelines" / "toxicity.env")
        self.assertEqual(
            quark_dag.task_config_path(ROOT, "pipelines/toxicity.env"), ROOT / "pipelines" / "toxicity.env"
        )
        with self.assertRaises(FileNotFoundError):
            quark_dag.task_config_path(ROOT, "no-such-task")
        self.assertEqual(quark_dag.run_dir("tox"), "data/runs/tox")
        self.assertEqual(quark_dag.run_dir("/tmp/x/run"), "/tmp/x/run")
        # sentiment ships its prompts (just setup makes them); QUARK_PROMPTS replaces them
        self.assertEqual(
            quark_dag.load_task(ROOT, "sentiment", {})["TRAIN_PROMPTS"], "data/prompts/sentiment/train.jsonl"
        )
        with tempfile.TemporaryDirectory() as d:  # a task without train prompts
            env = Path(d) / "mine.env"
            text = (ROOT / "pipelines" / "sentiment.env").read_text()
            env.write_text(re.sub(r"(?m)^TRAIN_PROMPTS=.*$", "TRAIN_PROMPTS=${QUARK_PROMPTS:-}", text))
            with self.assertRaises(ValueError):
                quark_dag.load_task(ROOT, str(env), {})
        self.assertEqual(
            quark_dag.load_task(ROOT, "sentiment", {"QUARK_PROMPTS": "p.jsonl"})["TRAIN_PROMPTS"], "p.jsonl"
        )

    def test_a_program_returns_its_one_path_or_raises_its_error_line(self):
        with tempfile.TemporaryDirectory() as d:
            ok = quark_dag.run_program(d, d, "sh", ["-c", "echo progress >&2; echo out/file.parquet"])
            self.assertEqual(ok, "out/file.parquet")
            with self.assertRaisesRegex(RuntimeError, r"sh exited with 2: quark-x: error: in.parquet: bad"):
                quark_dag.run_program(
                    d, d, "sh", ["-c", "echo step >&2; echo 'quark-x: error: in.parquet: bad' >&2; exit 2"]
                )
            with self.assertRaisesRegex(RuntimeError, "printed 2 paths"):
                quark_dag.run_program(d, d, "sh", ["-c", "echo a; echo b"])


FAKE_PROGRAM = """#!/bin/sh
# A quark program stand-in: logs its command line, prints a path.
name=$(basename "$0")
printf '%s' "$name" >>"$QUARK_FAKE_LOG"
for a in "$@"; do printf ' [%s]' "$a" >>"$QUARK_FAKE_LOG"; done
echo >>"$QUARK_FAKE_LOG"
echo "$QUARK_FAKE_DIR/$name-out"
"""


class OneDescription(unittest.TestCase):
    """A new option of a program is one edit in pipelines/stages.py, and it reaches
    both iterate.sh (the justfile's loop) and the DAG's task commands."""

    def test_a_new_fit_option_in_stages_py_reaches_iterate_sh_and_the_dag(self):
        import shutil

        with tempfile.TemporaryDirectory() as d:
            root = Path(d)
            for rel in [
                "scripts/iterate.sh",
                "scripts/task_env.sh",
                "pipelines/stages.py",
                "pipelines/airflow/quark_dag.py",
            ]:
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, root / rel)
            # The one edit: a flag of quark-fit read from a new task-file key.
            stages = root / "pipelines" / "stages.py"
            text = stages.read_text()
            self.assertIn("FIT_FLAGS = [\n", text)
            stages.write_text(text.replace("FIT_FLAGS = [\n", 'FIT_FLAGS = [\n    ("--max-grad-norm", "MAX_GRAD_NORM"),\n', 1))
            task = root / "pipelines" / "tiny.env"
            task.write_text(
                (ROOT / "pipelines" / "toxicity.env").read_text() + "MAX_GRAD_NORM=0.5\nITERATIONS=1\n"
            )
            bin_dir = root / "fake-bin"
            bin_dir.mkdir()
            for name in ["quark-sample", "quark-score", "quark-bin", "quark-fit"]:
                (bin_dir / name).write_text(FAKE_PROGRAM)
                (bin_dir / name).chmod(0o755)
            log = root / "calls.log"
            env = {
                **os.environ,
                "PATH": f"{bin_dir}:{os.environ['PATH']}",
                "QUARK_FAKE_LOG": str(log),
                "QUARK_FAKE_DIR": "data/runs/tiny",
            }
            subprocess.run(
                ["bash", str(root / "scripts" / "iterate.sh"), str(task), "tiny", "1"],
                env=env, check=True, capture_output=True,
            )  # fmt: skip
            fit_line = [l for l in log.read_text().splitlines() if l.startswith("quark-fit")]
            self.assertEqual(len(fit_line), 1, log.read_text())
            self.assertIn("[--max-grad-norm] [0.5]", fit_line[0])

            # The DAG's fit task, from the edited copy, with its programs caught.
            spec = importlib.util.spec_from_file_location("quark_dag_copy", root / "pipelines/airflow/quark_dag.py")
            dag_copy = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(dag_copy)
            calls = []
            dag_copy.run_program = lambda bin_dir, root, name, args: calls.append([name, *args]) or "ckpt"
            dag = dag_copy.quark_iteration()
            config = dag_copy.load_task(root, str(task), {})
            manifest = root / "manifest.tsv"
            manifest.write_text(dag_copy.MANIFEST_HEADER)
            p = {"root": str(root), "bin_dir": "", "dir": "run", "manifest": str(manifest), "it": 0,
                 "policy": "model", "condition": "none", "previous": "", "config": config}  # fmt: skip
            dag.get_task("fit").python_callable(p=p, generations=["g"], scored=["s"], pool="pool")
            self.assertEqual(len(calls), 1)
            self.assertEqual(calls[0][0], "quark-fit")
            i = calls[0].index("--max-grad-norm")
            self.assertEqual(calls[0][i + 1], "0.5")


class Dag(unittest.TestCase):
    def test_the_dag_loads_in_airflow_with_no_import_errors(self):
        try:
            from airflow.dag_processing.dagbag import DagBag  # Airflow >= 3.1
        except ImportError:
            from airflow.models.dagbag import DagBag
        bag = DagBag(str(DAG_FILE.parent))
        self.assertEqual(bag.import_errors, {})
        dag = bag.dags[quark_dag.DAG_ID]
        upstream = {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}
        self.assertEqual(
            upstream,
            {
                "plan": [],
                "shards": ["plan"],
                "sample": ["plan", "shards"],
                "score": ["plan", "sample"],
                "bin": ["plan", "score"],
                "fit": ["bin", "plan", "sample", "score"],
            },
        )
        mapped = {t.task_id for t in dag.tasks if type(t).__name__.endswith("MappedOperator")}
        self.assertEqual(mapped, {"sample", "score"})
        self.assertEqual(set(dag.params.keys()), {"task", "run", "workers", "root", "bin_dir", "env"})
        self.assertEqual(dag.max_active_runs, 1)


if __name__ == "__main__":
    unittest.main(verbosity=2)
