"""Does the control token's place at position 0 (an attention sink) mute it?

    python3 scripts/control_position.py MODEL PROMPTS [--prompts N]

Llama-family models send most attention to the first token, whatever it is, and
Quark puts the control token there. For pairs of embeddings standing in for two
control tokens (two random real tokens; the vocabulary's mean plus and minus a unit
vector, as the tokens start), this prints the mean KL between the next-token
distributions they give at every prompt position, with the pair at position 0 (as
quark-fit and quark-sample place it) and at position 1 behind a fixed first token,
and the attention the prompt's positions pay to the control token and to position 0
(transformers, f32, eager attention). docs/study.md quotes it for the default model.
"""

import argparse
import json
import random

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("prompts")
    ap.add_argument("--prompts", dest="n", type=int, default=60)
    args = ap.parse_args()
    torch.manual_seed(0)
    random.seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    emb = model.get_input_embeddings().weight.detach()
    with open(args.prompts) as f:
        prompts = [json.loads(line)["text"] for line in f][: args.n]
    firsts = {"'\\n'": tok("\n")["input_ids"][0]}
    for special in ("<|endoftext|>", "<|im_start|>"):
        if special in tok.get_vocab():
            firsts[special] = tok.convert_tokens_to_ids(special)
    mean = emb.mean(0)
    pairs = [("real", emb[i], emb[j]) for i, j in (random.sample(range(1000, 40000), 2) for _ in range(8))]
    for _ in range(4):
        u = torch.randn_like(mean)
        u = u / u.norm()
        pairs.append(("mean±1", mean + u, mean - u))
    places = [("position 0", None)] + [(f"position 1 behind {k}", v) for k, v in firsts.items()]

    kl, attention = {}, {}
    for text in prompts:
        prompt = emb[torch.tensor(tok(text)["input_ids"])]
        for place, first in places:
            before = [] if first is None else [emb[first]]
            at = len(before)
            for kind, a, b in pairs:
                with torch.no_grad():
                    out_a = model(inputs_embeds=torch.stack(before + [a, *prompt])[None], output_attentions=True)
                    out_b = model(inputs_embeds=torch.stack(before + [b, *prompt])[None])
                la = out_a.logits[0, at + 1 :].log_softmax(-1)
                lb = out_b.logits[0, at + 1 :].log_softmax(-1)
                kl.setdefault((place, kind), []).append((la.exp() * (la - lb)).sum(-1).mean().item())
                if kind == "real":
                    layers = out_a.attentions
                    on_control = torch.stack([x[0, :, at + 1 :, at].mean() for x in layers]).mean().item()
                    on_first = torch.stack([x[0, :, at + 1 :, 0].mean() for x in layers]).mean().item()
                    attention.setdefault(place, []).append((on_control, on_first))

    mean_of = lambda v: sum(v) / len(v)
    print(f"{len(prompts)} prompts of {args.prompts}; KL between the pair's next-token distributions (nats, mean over prompt positions)")
    print("| place | two real tokens | mean ± 1 | attention on the control token | on position 0 |")
    print("|---|---|---|---|---|")
    for place, _ in places:
        a = attention[place]
        print(
            f"| {place} | {mean_of(kl[(place, 'real')]):.3f} | {mean_of(kl[(place, 'mean±1')]):.3f} "
            f"| {mean_of([x[0] for x in a]):.3f} | {mean_of([x[1] for x in a]):.3f} |"
        )


if __name__ == "__main__":
    main()
