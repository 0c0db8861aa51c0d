"""The transformers side of the forward benchmark (lib/benches/model_forward.rs).

usage:
  bench_forward.py make OUT_DIR
      a random Llama with SmolLM2-135M's shape (30 layers, d=576, 9 heads, 3 kv
      heads, FFN 1536, vocab 49152, tied), for when the imported model is absent
  bench_forward.py run MODEL_DIR THREADS BATCH SEQ ITERS
      prints one JSON line: tokens per second of transformers' f32 forward over a
      BATCH x SEQ batch of seeded random ids, on THREADS threads, after one warm-up
"""

import json
import os
import sys
import time

import torch


def make(out):
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, os.path.dirname(__file__))
    from make_tiny import make_tokenizer

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    make_tokenizer().save(os.path.join(out, "tokenizer.json"))


def run(model_dir, threads, batch, seq, iters):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=pos)
        start = time.perf_counter()
        for _ in range(iters):
            model(input_ids=ids, attention_mask=mask, position_ids=pos)
        elapsed = time.perf_counter() - start
    print(json.dumps({"tokens_per_s": batch * seq * iters / elapsed, "threads": threads}))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2])
    else:
        run(sys.argv[2], *map(int, sys.argv[3:7]))
