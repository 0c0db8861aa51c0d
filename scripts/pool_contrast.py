"""How much a pool's quantile tokens can teach beyond what the prompt already says.

    python3 scripts/pool_contrast.py SCORED [--quantiles K] [--samples N ...]

SCORED is a quark-score file of the reference's samples, several per prompt. For each
N, the rows with sample_index < N are cut into K quantiles as quark-bin cuts them
(best reward first, ties by prompt_id and sample_index, equal sizes, the remainder in
the last). A quantile token can only learn to steer a prompt's completion where the
pool holds different quantiles for the same prompt: the script prints, per N, the
share of prompts whose rows span both the best and the worst quantile, and the share
of the worst quantile's rows whose prompt also has a row in the best. It also splits
the reward's variance (all samples) into the part between prompts and the part within
a prompt. docs/study.md quotes it, for the file these commands make (the study's
train split of `just study`, data/study/train.jsonl):

    g=$(quark-sample --model data/models/smollm2-135m --prompts data/study/train.jsonl \
      --out data/contrast/ --condition none --iteration 0 --seed 0 \
      --samples-per-prompt 8 --max-new-tokens 20 --min-new-tokens 3 --top-p 1.0 \
      --batch-size 32 --dtype auto --quiet)
    quark-score --in "$g" --scorer toxicity --out data/contrast/
"""

import argparse

import duckdb
import numpy as np


def quantiles(reward, prompt, sample, k):
    order = np.lexsort((sample, prompt, -reward))
    size = max(1, len(reward) // k)
    q = np.empty(len(reward), dtype=np.int64)
    q[order] = np.minimum(np.arange(len(reward)) // size, k - 1)
    return q


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scored")
    ap.add_argument("--quantiles", type=int, default=5)
    ap.add_argument("--samples", type=int, nargs="+", default=[1, 2, 4, 8])
    args = ap.parse_args()
    rows = duckdb.sql(
        f"select prompt_id, sample_index, reward from read_parquet('{args.scored}') "
        "where reward is not null order by prompt_id, sample_index"
    ).fetchnumpy()
    # prompt_id is a string key: its index among the sorted ids keeps quark-bin's order.
    prompt = np.unique(rows["prompt_id"], return_inverse=True)[1].astype(np.int64)
    sample = rows["sample_index"].astype(np.int64)
    reward = rows["reward"].astype(np.float64)
    k, worst = args.quantiles, args.quantiles - 1

    means = {p: reward[prompt == p].mean() for p in np.unique(prompt)}
    between = np.var([means[p] for p in prompt])
    total = np.var(reward)
    print(f"{len(np.unique(prompt))} prompts, {len(reward)} scored rows, "
          f"up to {sample.max() + 1} samples each")
    print(f"reward variance {total:.4f}: between prompts {between / total:.1%}, "
          f"within a prompt {1 - between / total:.1%}")
    print("| samples per prompt | rows | prompts with a best and a worst row "
          "| worst rows whose prompt has a best row |")
    print("|---|---|---|---|")
    for n in args.samples:
        keep = sample < n
        p, q = prompt[keep], quantiles(reward[keep], prompt[keep], sample[keep], k)
        best, bad = set(p[q == 0]), set(p[q == worst])
        both = best & bad
        worst_rows = p[q == worst]
        share = np.isin(worst_rows, list(both)).mean() if len(worst_rows) else 0.0
        print(f"| {n} | {keep.sum()} | {len(both) / len(np.unique(p)):.1%} | {share:.1%} |")


if __name__ == "__main__":
    main()
