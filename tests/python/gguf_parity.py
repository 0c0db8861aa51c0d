"""Reference check of a GGUF import (used by lib/tests/gguf.rs).

Loads the converted Hugging Face folder with transformers, greedily continues a
prompt, and compares its logits on a few sentences with transformers loading the
original GGUF directly (its own dequantization and Q/K un-permutation: the
independent reference). Prints one JSON object on stdout.

usage: gguf_parity.py CONVERTED_DIR GGUF_FILE
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

SENTENCES = [
    "The capital of France is Paris. The capital of Germany is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In 1969, 3 astronauts flew 384,400 km to the Moon.",
]


def main():
    converted, gguf = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tok = AutoTokenizer.from_pretrained(converted)
    ours = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    ids = tok(SENTENCES[0], return_tensors="pt").input_ids
    with torch.no_grad():
        gen = ours.generate(ids, max_new_tokens=3, do_sample=False)
    continuation = tok.decode(gen[0, ids.shape[1]:])
    ref = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(gguf)),
        gguf_file=os.path.basename(gguf),
        dtype=torch.float32,
    ).eval()
    diffs = []
    with torch.no_grad():
        for s in SENTENCES:
            x = tok(s, return_tensors="pt").input_ids
            a = ours(x).logits
            b = ref(x).logits
            diffs.append(float((a - b).abs().max()))
    json.dump(
        {
            "continuation": continuation,
            "first_token": tok.decode(gen[0, ids.shape[1]]),
            "max_abs_diff": max(diffs),
            "per_sentence": diffs,
        },
        sys.stdout,
    )
    print()


if __name__ == "__main__":
    main()
