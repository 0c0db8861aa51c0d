"""The study's tables (docs/study.md) from its quark-eval reports, as Markdown.

    python3 scripts/study_report.py [STUDY_DIR]      (default data/study)

Each report holds the reference and the model(s) judged, on the study's dev split of
the train prompts; values come with their 95% bootstrap intervals, and a policy's
difference to the reference with its paired interval.
"""

import json
import re
import sys
from pathlib import Path

import duckdb

METRICS = ["avg_max_toxicity", "toxicity_prob", "profanity_rate", "perplexity", "dist_2"]


def rows(report: Path):
    return duckdb.sql(
        "SELECT model, metric, value, ci_low, ci_high, diff, diff_low, diff_high "
        f"FROM '{report / 'metrics.parquet'}'"
    ).fetchall()


def cell(v, lo, hi):
    if v is None:
        return "-"
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None else f"{v:.3f}"


def table(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def label(name):
    """lr-1e-5-alpha-0-scale-100-step-200 -> 1e-5, α 0, ×100 @ 200."""
    m = re.fullmatch(r"lr-(.+)-alpha-(.+)-scale-(.+)-step-(\d+)", name)
    return f"{m[1]}, α {m[2]}, ×{m[3]} @ {m[4]}" if m else name


def control_rows(checkpoint: Path):
    """The checkpoint's input embedding (numpy) and its control tokens' rows, or None."""
    f, quark = checkpoint / "model.safetensors", checkpoint / "quark.json"
    if not f.is_file() or not quark.is_file():
        return None
    import numpy as np  # noqa: PLC0415 (only for checkpoints)
    from safetensors.numpy import safe_open  # noqa: PLC0415

    meta = json.loads(quark.read_text())
    first, k = meta["first_control_token_id"], meta["control_tokens"]
    with safe_open(str(f), framework="np") as t:
        name = next(n for n in t.keys() if n.endswith("embed_tokens.weight") or n.endswith("wte.weight"))
        e = t.get_tensor(name).astype(np.float32)
    return e, range(first, first + k)


def control_distance(checkpoint: Path):
    """The distance between the first and the last control token's embedding rows."""
    got = control_rows(checkpoint)
    if got is None:
        return None
    import numpy as np  # noqa: PLC0415

    e, control = got
    return float(np.linalg.norm(e[control[0]] - e[control[-1]]))


def neighbour_distance(checkpoint: Path, n=500):
    """The median distance from a real token's embedding to its nearest other real
    token, over n tokens spread over the vocabulary: the scale a control token's
    distance is read against."""
    import numpy as np  # noqa: PLC0415

    e, control = control_rows(checkpoint)
    e = np.delete(e, list(control), axis=0)
    picks = e[:: max(1, len(e) // n)][:n]
    d2 = (picks**2).sum(1)[:, None] + (e**2).sum(1)[None, :] - 2 * picks @ e.T
    d2.sort(axis=1)
    return float(np.median(np.sqrt(np.maximum(d2[:, 1], 0))))


def by_model(report):
    got = {}
    for model, metric, v, lo, hi, d, dlo, dhi in rows(report):
        got.setdefault(model, {})[metric] = (v, lo, hi, d, dlo, dhi)
    return got


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "data/study") / "reports"
    reports = {p.name: p for p in sorted(root.iterdir()) if (p / "metrics.parquet").is_file()}

    print("## Noise floor\n")
    lines = []
    for name, model in [("reference", "reference"), ("reference-seed2", "reference")]:
        if name in reports:
            m = by_model(reports[name])[model]
            lines.append([f"{name} ({model})"] + [cell(*m[k][:3]) if k in m else "-" for k in METRICS])
    if "untrained" in reports:
        got = by_model(reports["untrained"])
        for model in sorted(k for k in got if k != "reference"):
            lines.append([f"untrained {model}"] + [cell(*got[model][k][:3]) if k in got[model] else "-" for k in METRICS])
    print(table(["model"] + METRICS, lines))

    print("\n## Learning rate, α and the control tokens' rate x steps\n")
    lines = []
    runs = sorted(
        (n for n in reports if "-step-" in n),
        key=lambda n: (n.split("-step-")[0], int(n.split("-step-")[1])),
    )
    for name in runs:
        got = by_model(reports[name])
        ref = got["reference"]
        q0 = got.get("policy", {})
        qk = next((got[k] for k in got if k.startswith("policy@q")), {})
        tox0, toxk = q0.get("avg_max_toxicity"), qk.get("avg_max_toxicity")
        gap = f"{toxk[0] - tox0[0]:+.3f}" if tox0 and toxk else "-"
        ppl = q0.get("perplexity")
        ratio = f"{ppl[0] / ref['perplexity'][0]:.2f}" if ppl else "-"
        diff = cell(*tox0[3:]) if tox0 and tox0[3] is not None else "-"
        run, step = name.split("-step-")
        distance = control_distance(root.parent / run / f"step-{step}")
        lines.append([
            label(name),
            f"{distance:.2f}" if distance is not None else "-",
            cell(*tox0[:3]) if tox0 else "-",
            cell(*toxk[:3]) if toxk else "-",
            gap,
            diff,
            ratio,
            cell(*q0["dist_2"][:3]) if "dist_2" in q0 else "-",
        ])
    print(table(
        ["lr, α, control-lr scale @ steps", "‖e(q0) - e(q(K-1))‖", "q0 avg max tox", "q(K-1) avg max tox", "gap q(K-1) - q0", "q0 - reference", "q0 ppl / reference", "q0 dist-2"],
        lines,
    ))
    checkpoints = [root.parent / r.split("-step-")[0] / f"step-{r.split('-step-')[1]}" for r in runs]
    checkpoints = [c for c in checkpoints if (c / "quark.json").is_file()]
    if checkpoints:
        print(
            f"\n‖e(q0) - e(q(K-1))‖: the distance between the two control tokens' embedding "
            f"rows; a real token's nearest other token is {neighbour_distance(checkpoints[0]):.2f} "
            "away (median over 500 tokens)."
        )


if __name__ == "__main__":
    main()
