"""Loads model directories written by quark-rs (Model::save) with PyPI transformers
and writes their logits, so lib/tests/model_parity.rs can check that a checkpoint
saved in Rust means the same thing in Python.

usage: check_saved.py MODEL_DIR INPUTS OUT [MODEL_DIR INPUTS OUT ...]

INPUTS: a safetensors file with input_ids and attention_mask (left padded).
OUT:    a safetensors file with the logits (f32), positions = cumsum(mask) - 1.
Prints one JSON line per model: the ids transformers' tokenizer gives for
"<|quark:0|>Hello<|quark:1|>" and its vocabulary size.
"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main():
    args = sys.argv[1:]
    for model_dir, inputs, out in zip(args[0::3], args[1::3], args[2::3]):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
        x = load_file(inputs)
        mask = x["attention_mask"]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            logits = model(
                input_ids=x["input_ids"], attention_mask=mask, position_ids=position_ids
            ).logits
        save_file({"logits": logits.float().contiguous()}, out)
        ids = tok("<|quark:0|>Hello<|quark:1|>", add_special_tokens=False)["input_ids"]
        print(json.dumps({"ids": ids, "vocab": len(tok)}))


if __name__ == "__main__":
    main()
