"""Python baselines the Rust benchmarks compare against, run as their child process
on the same threads. Each mode prints one JSON line of figures.

  baseline.py forward  MODEL_DIR THREADS            transformers f32 forward, 16 x 64 tokens
  baseline.py generate MODEL_DIR THREADS PROMPTS    transformers generate, 64 prompts, top-p 0.9
  baseline.py fit_step MODEL_DIR THREADS            the Quark loss in PyTorch, one step, 16 x 48
"""

import json
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def forward(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size - 16, (16, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)  # warm-up
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            model(ids)
            best = min(best, time.perf_counter() - t)
    return {"tokens_per_s": 16 * 64 / best, "seconds": best, "peak_mib": peak_mib()}


def read_prompts(path, n):
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line)["prompt"]["text"])
            if len(out) == n:
                break
    return out


def generate(model_dir, prompts_path):
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    prompts = read_prompts(prompts_path, 64)
    torch.manual_seed(0)
    generated = 0
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), 16):
            enc = tok(prompts[i : i + 16], return_tensors="pt", padding=True)
            out = model.generate(
                **enc, do_sample=True, top_p=0.9, top_k=0, temperature=1.0, max_new_tokens=20,
                min_new_tokens=3, pad_token_id=tok.pad_token_id,
            )
            new = out[:, enc["input_ids"].shape[1]:]
            generated += int((new != tok.pad_token_id).sum()) if tok.pad_token_id != tok.eos_token_id else new.numel()
    secs = time.perf_counter() - t
    return {"tokens_per_s": generated / secs, "tokens": generated, "seconds": secs, "peak_mib": peak_mib()}


def fit_step(model_dir):
    """One Quark step: policy forward+backward, reference forward, NLL + KL - entropy."""
    policy = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-5, eps=1e-5)
    g = torch.Generator().manual_seed(0)
    vocab = policy.config.vocab_size
    ids = torch.randint(0, vocab, (16, 48), generator=g)
    completion = 20
    times = []
    for _ in range(3):
        t = time.perf_counter()
        logits = policy(ids).logits[:, :-1]
        with torch.no_grad():
            ref = reference(ids).logits[:, :-1]
        target = ids[:, 1:]
        mask = torch.zeros_like(target, dtype=torch.float32)
        mask[:, -completion:] = 1
        logp = logits.log_softmax(-1)
        logp0 = ref.log_softmax(-1)
        p = logp.exp()
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        kl = (p * (logp - logp0)).sum(-1)
        ent = -(p * logp).sum(-1)
        loss = ((nll + 0.05 * kl - 0.06 * ent) * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    best = min(times[1:])
    return {"seconds": best, "tokens_per_s": 16 * 48 / best, "peak_mib": peak_mib()}


if __name__ == "__main__":
    mode, model_dir, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)
    if mode == "forward":
        out = forward(model_dir)
    elif mode == "generate":
        out = generate(model_dir, sys.argv[4])
    elif mode == "fit_step":
        out = fit_step(model_dir)
    else:
        sys.exit(f"baseline.py: unknown mode {mode}")
    print(json.dumps(out))
