"""The table of a task study (scripts/task_study.sh) from its variants' quark-eval
reports, as Markdown: per variant, the reference and each judged model on the
study's dev split of the train prompts, each metric with its 95% bootstrap interval
and a policy's paired difference to the reference, and its perplexity as a ratio of
the reference's; where the evaluation measured it (eval/text-perplexity.json), the
perplexity on the dev prompts' own text as a ratio of the reference's, with its
paired interval.

    python3 scripts/task_study_report.py TASK [STUDY_DIR]   (default data/study/TASK)

The metrics shown are the task's (a variant such as repetition-ul-only takes its
task's); for any other task, every metric of its reports.
"""

import json
import sys
from pathlib import Path

import duckdb

METRICS = {
    "repetition": ["rep_4", "rep_2", "diversity", "dist_2", "perplexity"],
    "sentiment": ["share_positive", "reward", "dist_2", "perplexity"],
    "toxicity": ["avg_max_toxicity", "toxicity_prob", "dist_2", "perplexity"],
}


def cell(v, lo, hi):
    if v is None:
        return "-"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{v:.3f}"


def main(argv):
    if not argv:
        sys.exit("usage: task_study_report.py TASK [STUDY_DIR]")
    task = argv[0]
    root = Path(argv[1] if len(argv) > 1 else f"data/study/{task}")
    # A variant of a task (repetition-ul-only, say) reports its task's metrics; an
    # unknown task, every metric its reports hold.
    known = next((k for k in METRICS if task == k or task.startswith(f"{k}-")), None)
    metrics = METRICS.get(known) or [
        r[0] for r in duckdb.sql(f"SELECT DISTINCT metric FROM '{root}/*/eval/report/metrics.parquet' ORDER BY 1").fetchall()
    ]
    header = ["variant", "model", "iteration", "samples per prompt"]
    header += [h for m in metrics for h in (m, f"{m} − reference")]
    header += ["perplexity / reference", "text perplexity / reference"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for report in sorted(root.glob("*/eval/report/metrics.parquet")):
        variant = report.parents[2].name
        rows = duckdb.sql(
            "SELECT model, iteration, samples_per_prompt, metric, value, ci_low, ci_high, diff, diff_low, diff_high "
            f"FROM '{report}' ORDER BY model != 'reference', iteration, model, samples_per_prompt"
        ).fetchall()
        # A model is judged at one or more samples per prompt (eval.sh's headline and
        # curve counts): each is a row of its own.
        models = list(dict.fromkeys(r[:3] for r in rows))
        by = {(*r[:3], r[3]): r[4:] for r in rows}
        text = report.parents[1] / "text-perplexity.json"
        text = {r["model"]: r for r in json.loads(text.read_text())} if text.is_file() else {}
        ref_ppl = {n: v[0] for (m, _, n, k), v in by.items() if m == "reference" and k == "perplexity"}
        for model, iteration, n in models:
            line = [variant, model, str(iteration), str(n)]
            for m in metrics:
                v = by.get((model, iteration, n, m))
                line += [cell(*v[:3]), cell(*v[3:])] if v else ["-", "-"]
            ppl = by.get((model, iteration, n, "perplexity"))
            line.append(f"{ppl[0] / ref_ppl[n]:.2f}" if ppl and ref_ppl.get(n) else "-")
            t = text.get(f"policy-iteration-{iteration}") if model == "policy" else None
            line.append(f"{t['ratio']:.2f} [{t['ratio_low']:.2f}, {t['ratio_high']:.2f}]" if t else "-")
            print("| " + " | ".join(line) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
