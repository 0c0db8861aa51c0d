"""GGUF fixtures written by the reference `gguf` package (llama.cpp's own Python
writer), for lib/tests/gguf.rs.

  gguf_fixture.py types OUT_DIR
      OUT_DIR/types.gguf: metadata of every value type (arrays included) and one
      tensor per type (F32, F16, BF16, Q4_0, Q4_1, Q8_0) quantized by `gguf.quants`;
      OUT_DIR/<tensor>.f32: its dequantization by `gguf.quants.dequantize` (numpy),
      raw little-endian f32; OUT_DIR/expected.json: the metadata and shapes.
  gguf_fixture.py llama OUT_DIR
      OUT_DIR/ref/: a tiny random transformers LlamaForCausalLM (Hugging Face layout);
      OUT_DIR/tiny-llama.gguf: the same model as llama.cpp's converter writes it
      (llama.* metadata, GGUF tensor names, Q/K rows permuted, a byte-level
      vocabulary), weights in F32, F16 and Q8_0.
  gguf_fixture.py compare CONVERTED_DIR REF_DIR
      Prints {"max_abs_diff": ...}: logits of the two folders on a few token batches.
"""

import json
import os
import sys

import numpy as np


def types(out):
    import gguf
    from gguf.constants import GGMLQuantizationType as Q

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(os.path.join(out, "types.gguf"), "llama")
    meta = {
        "t.u8": (200, w.add_uint8),
        "t.i8": (-100, w.add_int8),
        "t.u16": (60000, w.add_uint16),
        "t.i16": (-30000, w.add_int16),
        "t.u32": (4000000000, w.add_uint32),
        "t.i32": (-2000000000, w.add_int32),
        "t.u64": (2**63 + 5, w.add_uint64),
        "t.i64": (-(2**62), w.add_int64),
        "t.f32": (0.5, w.add_float32),
        "t.f64": (3.141592653589793, w.add_float64),
        "t.bool": (True, w.add_bool),
        "t.str": ("héllo 🤖", w.add_string),
        "t.arr_i32": ([1, -2, 3], w.add_array),
        "t.arr_str": (["a", "", "ü b"], w.add_array),
        "t.arr_f32": ([0.25, -1.5], w.add_array),
        "t.arr_nested": ([[1, 2], [3]], w.add_array),
    }
    for k, (v, add) in meta.items():
        add(k, v)
    shapes = {}
    for name, qt, shape in [
        ("f32", Q.F32, (3, 64)),
        ("f16", Q.F16, (2, 32)),
        ("bf16", Q.BF16, (2, 32)),
        ("q4_0", Q.Q4_0, (4, 64)),
        ("q4_1", Q.Q4_1, (5, 96)),
        ("q8_0", Q.Q8_0, (3, 128)),
    ]:
        x = (rng.standard_normal(shape) * rng.uniform(0.1, 3.0)).astype(np.float32)
        if qt == Q.F32:
            data, ref = x, x
        elif qt == Q.F16:
            data = x.astype(np.float16)
            ref = data.astype(np.float32)
        else:
            data = gguf.quants.quantize(x, qt)
            ref = gguf.quants.dequantize(data, qt)
        if qt in (Q.F32, Q.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=qt)
        ref.astype("<f4").tofile(os.path.join(out, name + ".f32"))
        shapes[name] = list(shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(os.path.join(out, "expected.json"), "w") as f:
        json.dump({"metadata": {k: v for k, (v, _) in meta.items()}, "shapes": shapes}, f)


def permute(w, n_head):
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, verbatim in effect.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama(out):
    import gguf
    import torch
    from gguf.constants import GGMLQuantizationType as Q
    from transformers import LlamaConfig, LlamaForCausalLM

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    torch.manual_seed(0)
    spell = bytes_to_unicode()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [spell[b] for b in range(256)]
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens += [m.replace(" ", "") for m in merges]
    rope_theta = 50000.0
    cfg = LlamaConfig(
        vocab_size=len(tokens), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    # Norm weights are ones at init: make them random so a mix-up shows.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(os.path.join(out, "ref"))
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}

    w = gguf.GGUFWriter(os.path.join(out, "tiny-llama.gguf"), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def put(name, x, qt):
        if qt == Q.F32:
            w.add_tensor(name, x)
        elif qt == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qt), raw_dtype=qt)

    put("token_embd.weight", sd["model.embed_tokens.weight"], Q.Q8_0)
    put("output.weight", sd["lm_head.weight"], Q.F16)
    put("output_norm.weight", sd["model.norm.weight"], Q.F32)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"], Q.F32)
        put(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"], Q.F32)
        put(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads), Q.F32)
        put(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads), Q.F32)
        put(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"], Q.F32)
        put(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"], Q.F32)
        put(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"], Q.F32)
        put(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"], Q.F32)
        put(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"], Q.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # The reference with the embedding and head as the GGUF holds them (Q8_0, F16),
    # so the comparison isolates the conversion from the quantization error.
    emb = gguf.quants.dequantize(gguf.quants.quantize(sd["model.embed_tokens.weight"], Q.Q8_0), Q.Q8_0)
    head = sd["lm_head.weight"].astype(np.float16).astype(np.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.from_numpy(emb))
        model.lm_head.weight.copy_(torch.from_numpy(head))
    model.save_pretrained(os.path.join(out, "ref"))


def compare(converted, ref):
    import torch
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, a.config.vocab_size, (3, 17), generator=g)
    with torch.no_grad():
        d = (a(x).logits - b(x).logits).abs().max().item()
    json.dump({"max_abs_diff": d, "vocab_size": a.config.vocab_size}, sys.stdout)
    print()


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"types": types, "llama": llama, "compare": compare}[cmd](*args)
