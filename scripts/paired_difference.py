"""The paired difference of a scored column between two models' samples of the same
prompts (two runs' policies, say: Quark against its ablation), with a 95% bootstrap
interval over prompts, as quark-eval gives each policy's difference to the reference
(scripts/bootstrap.py: its resamples and percentiles).

    python3 scripts/paired_difference.py COLUMN A.parquet B.parquet

A and B are scored files (quark-score output: eval.sh's `eval/scored-*.parquet`) of the
same prompts; COLUMN is one the scorers wrote (rep_4, perplexity, reward, ...). Each
prompt's value is the mean over its samples; prints B − A over the prompts both hold.
"""

import sys

import duckdb

from bootstrap import interval, resamples


def per_prompt(path, column):
    return dict(
        duckdb.sql(
            f'SELECT prompt_id, avg("{column}") FROM read_parquet(?) WHERE "{column}" IS NOT NULL GROUP BY prompt_id',
            params=[path],
        ).fetchall()
    )


def main(argv):
    if len(argv) != 3:
        sys.exit("usage: paired_difference.py COLUMN A.parquet B.parquet")
    column, a_path, b_path = argv
    a, b = per_prompt(a_path, column), per_prompt(b_path, column)
    prompts = sorted(a.keys() & b.keys())
    if not prompts:
        sys.exit(f"paired_difference: {a_path} and {b_path} share no prompt with a {column}")
    diffs = [b[p] - a[p] for p in prompts]
    mean = sum(diffs) / len(diffs)
    low, high = interval([sum(diffs[i] for i in draw) / len(draw) for draw in resamples(len(diffs))])
    mean_a = sum(a[p] for p in prompts) / len(prompts)
    mean_b = sum(b[p] for p in prompts) / len(prompts)
    print(f"{column} over {len(prompts)} prompts: A {mean_a:.3f}, B {mean_b:.3f}")
    print(f"B - A: {mean:+.3f} [{low:+.3f}, {high:+.3f}] (paired 95% bootstrap interval over prompts)")


if __name__ == "__main__":
    main(sys.argv[1:])
