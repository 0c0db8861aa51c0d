"""Language-modelling perplexity on held-out human text: the paper's perplexity for
the repetition task (as Welleck et al.'s unlikelihood work measures it), where the
perplexity of a model's own greedy completions says little (a degenerate loop is the
likeliest text there is).

    python3 scripts/text_perplexity.py PROMPTS --model NAME=DIR [--model NAME=DIR ...]
        [--limit N] [--condition K] [--out FILE.json]

Each prompt's text (a passage of human prose the fit never trained on: the task's
held-out prompts) is scored teacher-forced by each model (transformers, f32, CPU),
every token from the text before it; a checkpoint with control tokens reads
<|quark:K|> in front (K = 0, the token it is sampled with), and its control-token
columns are dropped from the softmax, as quark-fit drops them. The first text token,
which the reference would predict from nothing, is scored by no model. Perplexity is
exp(total NLL / total tokens) over the prompts, with a 95% bootstrap interval over
prompts, and every model after the first gets the paired ratio to the first model's
(the reference) with its interval. Prints a table; --out writes the figures as JSON.
"""

import argparse
import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging

from bootstrap import interval, resamples

logging.disable_progress_bar()


def texts(path, limit):
    out = []
    # (split on newlines only: str.splitlines would also split inside a JSON string)
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").split("\n"), 1):
        if line.strip():
            row = json.loads(line)
            prompt = row.get("prompt", row)
            text = prompt.get("text") if isinstance(prompt, dict) else prompt
            if not isinstance(text, str):
                raise SystemExit(f"text_perplexity: {path}:{number}: no prompt text (`prompt.text`, `prompt` or `text`)")
            out.append(text)
    return out[:limit] if limit else out


def nll_per_text(model_dir, ids_per_text, condition):
    """(summed NLL, tokens) of every text under the model of `model_dir`."""
    quark = Path(model_dir) / "quark.json"
    meta = json.loads(quark.read_text()) if quark.is_file() else None
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    if meta and meta.get("control_tokens"):
        first, k = meta["first_control_token_id"], meta["control_tokens"]
        if not 0 <= condition < k:
            raise SystemExit(f"text_perplexity: {model_dir} has {k} control tokens, not <|quark:{condition}|>")
        kept = torch.tensor([i for i in range(vocab) if not first <= i < first + k])
        prefix = [first + condition]
    else:
        kept, prefix = None, []
    out = []
    for ids in ids_per_text:
        full = torch.tensor([prefix + ids])
        with torch.no_grad():
            logits = model(full).logits[0].float()
        if kept is not None:
            logits = logits[:, kept]
            # (Ids above the control tokens move down by K among the kept columns.)
            cols = [t - k if t >= first + k else t for t in ids]
        else:
            cols = ids
        logp = torch.log_softmax(logits, -1)
        # Position p predicts token p + 1; the text's tokens from its second one.
        start = len(prefix)
        got = logp[start : start + len(ids) - 1].gather(1, torch.tensor(cols[1:])[:, None])
        out.append((-got.sum().item(), len(ids) - 1))
    return out


def ppl(rows, pick):
    nll = sum(rows[i][0] for i in pick)
    n = sum(rows[i][1] for i in pick)
    return math.exp(nll / n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("prompts")
    ap.add_argument("--model", action="append", required=True, help="NAME=DIR; the first is the reference")
    ap.add_argument("--limit", type=int, default=0)
    ap.add_argument("--condition", type=int, default=0)
    ap.add_argument("--out")
    args = ap.parse_args()
    models = [m.split("=", 1) for m in args.model]
    if any(len(m) != 2 for m in models):
        raise SystemExit("text_perplexity: --model NAME=DIR")
    tokenizer = AutoTokenizer.from_pretrained(models[0][1])
    ids_per_text = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts(args.prompts, args.limit)]
    ids_per_text = [ids for ids in ids_per_text if len(ids) >= 2]
    if not ids_per_text:
        raise SystemExit(f"text_perplexity: {args.prompts}: no text of two or more tokens")
    scores = {name: nll_per_text(d, ids_per_text, args.condition) for name, d in models}
    everything = list(range(len(ids_per_text)))
    draws = resamples(len(everything))
    reference = models[0][0]
    figures = []
    for name, _ in models:
        rows = scores[name]
        value = ppl(rows, everything)
        low, high = interval([ppl(rows, d) for d in draws])
        row = {"model": name, "perplexity": value, "ci_low": low, "ci_high": high, "texts": len(rows)}
        if name != reference:
            ref = scores[reference]
            row["ratio"] = value / ppl(ref, everything)
            row["ratio_low"], row["ratio_high"] = interval([ppl(rows, d) / ppl(ref, d) for d in draws])
        figures.append(row)
    tokens = sum(n for _, n in scores[reference])
    print(f"perplexity on held-out text ({args.prompts}: {len(ids_per_text)} texts, {tokens} tokens scored)")
    print("[95% bootstrap interval over texts; ratio to the first model, paired]")
    for r in figures:
        line = f"  {r['model']:<24} {r['perplexity']:8.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
        if "ratio" in r:
            line += f"   ratio {r['ratio']:.3f} [{r['ratio_low']:.3f}, {r['ratio_high']:.3f}]"
        print(line)
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
