"""Python baselines the Rust benchmarks compare against, run as their child process
on the same threads. Each mode prints one JSON line of figures. DTYPE is f32, or bf16:
generate on a model loaded in bf16; a fit step under bf16 autocast (f32 master
weights and Adam, as quark-fit's bf16), the frozen reference held in bf16.

  baseline.py forward  MODEL_DIR THREADS                  transformers f32 forward, 16 x 64 tokens
  baseline.py generate MODEL_DIR THREADS PROMPTS DTYPE    transformers generate, 64 prompts, top-p 0.9
  baseline.py fit_step MODEL_DIR THREADS DTYPE            one Quark step in PyTorch, 16 x (1 + 48)
  baseline.py fit_pool MODEL_DIR THREADS DTYPE POOL ORDER Quark steps on a pool file's rows

The fit step is written as a PyTorch expert would write the Quark loss: the head runs
only on the positions that predict completion tokens, fused Adam, positions counted
from the attention mask (left padding), the control token prepended for the policy.
fit_pool reads the pool's trained rows (a quantile set) in file order and runs the
steps ORDER (a JSON file: {"batches": [[row, ...], ...]}) names: quark-fit's rows in
quark-fit's order.
"""

import contextlib
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


DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def generate(model_dir, prompts_path, dtype):
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=DTYPES[dtype]).eval()
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


def left_pad(rows):
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def hidden_tail(model, ids, mask, n):
    """The last layer's output at the n positions that predict the last n tokens."""
    base = getattr(model, model.base_model_prefix)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    h = base(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
    return h[:, -n - 1:-1]


class QuarkStep:
    """policy forward and backward on control token + prompt + completion, the frozen
    reference on prompt + completion, NLL + beta KL - alpha entropy over the completion
    tokens, Adam."""

    def __init__(self, model_dir, dtype, k=5, kl=0.05, entropy=0.06):
        self.policy = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        self.vocab = self.policy.config.vocab_size
        self.policy.resize_token_embeddings(self.vocab + k)
        self.reference = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=DTYPES[dtype]).eval()
        self.reference.requires_grad_(False)
        try:
            self.opt = torch.optim.Adam(self.policy.parameters(), lr=1e-5, eps=1e-5, fused=True)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.Adam(self.policy.parameters(), lr=1e-5, eps=1e-5)
        self.autocast = dtype == "bf16"
        self.kl, self.entropy = kl, entropy

    def __call__(self, rows):
        """rows: (quantile, prompt ids, completion ids)."""
        span = max(len(c) for _, _, c in rows)
        pol_ids, pol_mask = left_pad([[self.vocab + q] + p + c for q, p, c in rows])
        ref_ids, ref_mask = left_pad([p + c for _, p, c in rows])
        target = torch.zeros(len(rows), span, dtype=torch.long)
        on = torch.zeros(len(rows), span)
        for i, (_, _, c) in enumerate(rows):
            target[i, span - len(c):] = torch.tensor(c, dtype=torch.long)
            on[i, span - len(c):] = 1
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with cast:
            logits = self.policy.lm_head(hidden_tail(self.policy, pol_ids, pol_mask, span))
            with torch.no_grad():
                ref = self.reference.lm_head(hidden_tail(self.reference, ref_ids, ref_mask, span))
        logp = logits[..., : self.vocab].float().log_softmax(-1)
        logp0 = ref.float().log_softmax(-1)
        p = logp.exp()
        nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        p_logp = (p * logp).sum(-1)
        kl = p_logp - (p * logp0).sum(-1)
        loss = ((nll + self.kl * kl + self.entropy * p_logp) * on).sum() / on.sum()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def timed(step, rows):
    t = time.perf_counter()
    step(rows)
    return time.perf_counter() - t


def fit_step(model_dir, dtype):
    """The same random batch three times; the best step after the first."""
    step = QuarkStep(model_dir, dtype)
    g = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(0, step.vocab, (n,), generator=g).tolist()
    rows = [(i % 5, draw(28), draw(20)) for i in range(16)]
    times = [timed(step, rows) for _ in range(3)]
    best = min(times[1:])
    return {"seconds": best, "tokens_per_s": 16 * 48 / best, "peak_mib": peak_mib()}


def fit_pool(model_dir, dtype, pool, order):
    """The steps ORDER names on the pool's rows; the mean step after the first."""
    import duckdb

    table = duckdb.sql(
        "SELECT quantile, prompt_tokens, completion_tokens FROM read_parquet(?, file_row_number = true) "
        "WHERE quantile IS NOT NULL ORDER BY file_row_number",
        params=[pool],
    ).fetchall()
    with open(order, encoding="utf-8") as f:
        batches = json.load(f)["batches"]
    k = int(duckdb.sql("SELECT max(quantile) + 1 FROM read_parquet(?)", params=[pool]).fetchall()[0][0])
    step = QuarkStep(model_dir, dtype, k=k)
    times = [timed(step, [table[i] for i in b]) for b in batches]
    mean = sum(times[1:]) / len(times[1:])
    tokens = sum(len(table[i][1]) + len(table[i][2]) for b in batches[1:] for i in b) / len(batches[1:])
    return {"seconds": mean, "tokens_per_s": tokens / mean, "peak_mib": peak_mib()}


if __name__ == "__main__":
    mode, model_dir, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(threads)
    if mode == "forward":
        out = forward(model_dir)
    elif mode == "generate":
        out = generate(model_dir, sys.argv[4], sys.argv[5])
    elif mode == "fit_step":
        out = fit_step(model_dir, sys.argv[4])
    elif mode == "fit_pool":
        out = fit_pool(model_dir, sys.argv[4], sys.argv[5], sys.argv[6])
    else:
        sys.exit(f"baseline.py: unknown mode {mode}")
    print(json.dumps(out))
