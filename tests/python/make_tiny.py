"""Builds tiny random checkpoints with PyPI transformers and reference logits for the
Rust parity tests (lib/tests/model_parity.rs). No weights are downloaded: every model
is randomly initialised from a fixed seed.

usage: make_tiny.py OUT_DIR

Writes into OUT_DIR:
  gpt2/            GPT2LMHeadModel (tied head), single model.safetensors
  llama-tied/      LlamaForCausalLM, GQA (4 heads, 2 kv heads), tied head, default RoPE
  llama-untied/    LlamaForCausalLM, GQA, untied head, llama3 rope scaling, SHARDED
                   (model-0000x-of-0000y.safetensors + model.safetensors.index.json)
  <name>.ref.safetensors  input_ids/attention_mask of a left-padded batch and the
                   transformers logits for it (f32, and bf16 weights as `logits_bf16`);
                   positions = cumsum(mask) - 1
  tokens.json      the tokenizer's ids for a few probe texts (the Rust tokenizer must agree)
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

CORPUS = [
    "The capital of France is Paris. The capital of Germany is Berlin.",
    "A quick brown fox jumps over the lazy dog; the dog does not mind.",
    "fn main() { println!(\"hello, world\"); } // Rust code",
    "def f(x):\n    return x * 2  # Python code",
    "Café, naïve, résumé, déjà vu: accents everywhere.",
    "Emoji: 🎉🚀 and numbers 12345 67890.",
    "Language models predict the next token from the previous ones.",
] * 20

PROBES = [
    "Hello world, this is a tiny test of the model.",
    "Short one",
    "Émoji 🎉 and code: fn main() { }",
]


def make_tokenizer():
    """A byte-level BPE (GPT-2 style) trained on CORPUS: about 400 ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def perturb(model, scale):
    """Random norms and biases too (they start at 1 and 0), so a missing bias or a
    wrong norm shows up in the logits."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def left_padded_batch(tok, pad_id):
    ids = [tok.encode(t).ids for t in PROBES]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(ids), width), dtype=torch.int64)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = torch.tensor(x)
        mask[i, width - len(x):] = 1
    return input_ids, mask


def reference(model, model_dir, input_ids, mask, path):
    # Positions from the mask, as generation does: left padding must not shift them.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits
        # The saved checkpoint loaded in bf16 as users load it (this keeps the rotary
        # frequencies in f32, which `model.to(torch.bfloat16)` would round).
        bf16 = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
        logits_bf16 = bf16(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits
    save_file(
        {
            "input_ids": input_ids,
            "attention_mask": mask,
            "logits": logits.float().contiguous(),
            "logits_bf16": logits_bf16.float().contiguous(),
        },
        path,
    )


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    tok = make_tokenizer()
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id("<|endoftext|>")
    with open(os.path.join(out, "tokens.json"), "w") as f:
        json.dump({"texts": PROBES, "ids": [tok.encode(t).ids for t in PROBES]}, f)
    input_ids, mask = left_padded_batch(tok, eos)

    gpt2 = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
            bos_token_id=eos, eos_token_id=eos, initializer_range=0.1,
        )
    ).eval()
    llama_common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=eos, eos_token_id=eos, initializer_range=0.1, rms_norm_eps=1e-5,
    )
    llama_tied = LlamaForCausalLM(
        LlamaConfig(**llama_common, tie_word_embeddings=True, rope_theta=10000.0)
    ).eval()
    llama_untied = LlamaForCausalLM(
        LlamaConfig(
            **llama_common,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
    ).eval()

    for name, model, shard in [
        ("gpt2", gpt2, None),
        ("llama-tied", llama_tied, None),
        ("llama-untied", llama_untied, "60KB"),
    ]:
        perturb(model, 0.1)
        d = os.path.join(out, name)
        if shard:
            model.save_pretrained(d, max_shard_size=shard)
        else:
            model.save_pretrained(d)
        tok.save(os.path.join(d, "tokenizer.json"))
        reference(model, d, input_ids, mask, os.path.join(out, f"{name}.ref.safetensors"))


if __name__ == "__main__":
    main()
