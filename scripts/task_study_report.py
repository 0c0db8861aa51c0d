"""The table of a task study (scripts/task_study.sh) from its variants' quark-eval
reports, as Markdown: per variant, the reference and each judged model on the
study's dev split of the train prompts, each metric with its 95% bootstrap interval
and a policy's paired difference to the reference, and its perplexity as a ratio of
the reference's; where the evaluation measured it (eval/text-perplexity.json), the
perplexity on the dev prompts' own text as a ratio of the reference's, with its
paired interval.

    python3 scripts/task_study_report.py TASK [STUDY_DIR]   (default data/study/TASK)
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
    if not argv or argv[0] not in METRICS:
        sys.exit(f"usage: task_study_report.py {{{','.join(METRICS)}}} [STUDY_DIR]")
    task = argv[0]
    root = Path(argv[1] if len(argv) > 1 else f"data/study/{task}")
    metrics = METRICS[task]
    header = ["variant", "model", "iteration"]
    header += [h for m in metrics for h in (m, f"{m} − reference")]
    header += ["perplexity / reference", "text perplexity / reference"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for report in sorted(root.glob("*/eval/report/metrics.parquet")):
        variant = report.parents[2].name
        rows = duckdb.sql(
            "SELECT model, iteration, metric, value, ci_low, ci_high, diff, diff_low, diff_high "
            f"FROM '{report}' ORDER BY model != 'reference', iteration, model"
        ).fetchall()
        models = list(dict.fromkeys((r[0], r[1]) for r in rows))
        by = {(r[0], r[1], r[2]): r[3:] for r in rows}
        text = report.parents[1] / "text-perplexity.json"
        text = {r["model"]: r for r in json.loads(text.read_text())} if text.is_file() else {}
        ref_ppl = next((v[0] for (m, _, k), v in by.items() if m == "reference" and k == "perplexity"), None)
        for model, iteration in models:
            line = [variant, model, str(iteration)]
            for m in metrics:
                v = by.get((model, iteration, m))
                line += [cell(*v[:3]), cell(*v[3:])] if v else ["-", "-"]
            ppl = by.get((model, iteration, "perplexity"))
            line.append(f"{ppl[0] / ref_ppl:.2f}" if ppl and ref_ppl else "-")
            t = text.get(f"policy-iteration-{iteration}") if model == "policy" else None
            line.append(f"{t['ratio']:.2f} [{t['ratio_low']:.2f}, {t['ratio_high']:.2f}]" if t else "-")
            print("| " + " | ".join(line) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
