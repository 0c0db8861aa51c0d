"""How much a pool's quantile tokens can teach beyond what the prompt already says.

    python3 scripts/pool_contrast.py SCORED [--quantiles K] [--samples N ...]

SCORED is a quark-score file of the reference's samples, several per prompt. For each
N, quark-bin (on PATH) cuts the rows with sample_index < N into K quantiles. A
quantile token can only learn to steer a prompt's completion where the pool holds
different quantiles for the same prompt: the script prints, per N, the share of
prompts whose rows span both the best and the worst quantile, and the share of the
worst quantile's rows whose prompt also has a row in the best. It also splits the
reward's variance (all samples) into the part between prompts and the part within a
prompt. docs/study.md quotes it, for the file these commands make (the study's
train split of `just study`, data/study/train.jsonl):

    g=$(quark-sample --model data/models/smollm2-135m --prompts data/study/train.jsonl \
      --out data/contrast/ --condition none --iteration 0 --seed 0 \
      --samples-per-prompt 8 --max-new-tokens 20 --min-new-tokens 3 --top-p 1.0 \
      --batch-size 32 --dtype auto --quiet)
    quark-score --in "$g" --scorer toxicity --out data/contrast/
"""

import argparse
import subprocess
import tempfile
from pathlib import Path

import duckdb
import numpy as np


def binned(scored, n, k, tmp):
    """(prompt_id, quantile) of quark-bin's pool of the rows with sample_index < n."""
    subset = Path(tmp) / f"first-{n}.parquet"
    duckdb.sql(
        f"copy (select * from read_parquet('{scored}') where sample_index < {n}) "
        f"to '{subset}' (format parquet)"
    )
    pool = subprocess.run(
        ["quark-bin", "--in", str(subset), "--quantiles", str(k), "--out", f"{tmp}/"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    rows = duckdb.sql(
        f"select prompt_id, quantile from read_parquet('{pool}') where quantile is not null"
    ).fetchnumpy()
    return rows["prompt_id"], rows["quantile"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scored")
    ap.add_argument("--quantiles", type=int, default=5)
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    rows = duckdb.sql(
        f"select prompt_id, sample_index, reward from read_parquet('{args.scored}') "
        "where reward is not null"
    ).fetchnumpy()
    prompt = np.unique(rows["prompt_id"], return_inverse=True)[1]
    reward = rows["reward"].astype(np.float64)
    means = np.bincount(prompt, reward) / np.bincount(prompt)
    between, total = np.var(means[prompt]), np.var(reward)
    print(f"{len(means)} prompts, {len(reward)} scored rows, "
          f"up to {rows['sample_index'].max() + 1} samples each")
    print(f"reward variance {total:.4f}: between prompts {between / total:.1%}, "
          f"within a prompt {1 - between / total:.1%}")
    print("| samples per prompt | rows | prompts with a best and a worst row "
          "| worst rows whose prompt has a best row |")
    print("|---|---|---|---|")
    worst = args.quantiles - 1
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.samples:
            p, q = binned(args.scored, n, args.quantiles, tmp)
            both = set(p[q == 0]) & set(p[q == worst])
            share = np.isin(p[q == worst], list(both)).mean()
            print(f"| {n} | {len(p)} | {len(both) / len(set(p)):.1%} | {share:.1%} |")


if __name__ == "__main__":
    main()
