"""How much a policy's control tokens tell it about the reward, on its training rows.

    python3 scripts/control_information.py POOL CHECKPOINT [CHECKPOINT ...] [--rows N]

For N rows of the pool's best and worst quantiles (a fixed pseudo-random choice), the
mean NLL per completion token under each checkpoint (transformers, f32), conditioned on
<|quark:0|> and on <|quark:K-1|>. A policy that has learned what the tokens stand for
gives each quantile's rows a lower NLL under their own token; equal NLLs mean the
tokens are ignored. docs/study.md quotes it for the study's checkpoints.
"""

import argparse
import json
from pathlib import Path

import duckdb
import torch
from transformers import AutoModelForCausalLM


def model_vocab(path):
    return json.loads((Path(path) / "config.json").read_text())["vocab_size"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("pool")
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--rows", type=int, default=300)
    args = ap.parse_args()
    meta = dict(duckdb.sql(f"select key, value from parquet_kv_metadata('{args.pool}')").fetchall())
    k = json.loads(meta[b"quark.params"].decode())["quantiles"]
    rows = duckdb.sql(
        f"select prompt_tokens, completion_tokens, quantile from '{args.pool}' "
        f"where quantile in (0, {k - 1}) and len(completion_tokens) > 0 "
        f"order by hash(prompt_id, sample_index) limit {args.rows}"
    ).fetchall()
    for path in args.checkpoints:
        meta = json.loads((Path(path) / "quark.json").read_text())
        first = meta["first_control_token_id"]
        # The real tokens' columns: the control tokens' (and any spare rows' above
        # them) dropped, as quark-fit drops them.
        kept = [i for i in range(model_vocab(path)) if not first <= i < first + meta["control_tokens"]]
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        nll = {}
        for prompt, completion, q in rows:
            for token in (0, k - 1):
                ids = torch.tensor([[first + token, *prompt, *completion]])
                with torch.no_grad():
                    logits = model(ids).logits[0][:, kept].float()
                logp = torch.log_softmax(logits, -1)
                start = ids.shape[1] - len(completion)
                # (Ids above the control tokens move down by K among the kept columns.)
                cols = [t - meta["control_tokens"] if t >= first + meta["control_tokens"] else t for t in completion]
                got = logp[start - 1 : -1].gather(1, torch.tensor(cols)[:, None])
                nll.setdefault((q, token), []).append(-got.mean().item())
        print(path)
        for (q, token), v in sorted(nll.items()):
            print(f"  rows of quantile {q} under <|quark:{token}|>: NLL {sum(v) / len(v):.4f} a token ({len(v)} rows)")


if __name__ == "__main__":
    main()
