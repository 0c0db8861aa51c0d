//! GGUF import: reads a GGUF v2/v3 file (llama.cpp's single-file model format),
//! dequantizes its tensors to f32 and writes the Hugging Face layout of a
//! `LlamaForCausalLM` (config.json, model.safetensors, tokenizer.json and the small
//! generation/tokenizer configs) that [`crate`]'s models and Python transformers load.
//!
//! This module owns the file format and the conversion; it knows nothing about
//! running a model. Format reference: ggml's `docs/gguf.md`; tensor names and the
//! Q/K row permutation: llama.cpp's `convert_hf_to_gguf.py`, which this inverts.

//!
//! [`file`] reads the format, [`dequant`] the tensor types and [`tokenizer`] the
//! vocabulary; this file maps llama.cpp's tensor names and metadata onto the
//! checkpoint that [`crate::model::llama`] defines (its key and shape table) and
//! runs the import as a stage.

pub mod dequant;
pub mod file;
pub mod tokenizer;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::{json, Value as Json};

use crate::model::llama;
use crate::stage::{write_atomic, AtomicDir, Stage};
pub use dequant::{dequantize, GgmlType, QK};
pub use file::{Gguf, TensorInfo, Value, DEFAULT_ALIGNMENT, MAGIC};
use tokenizer::{side_configs, special_ids, tokenizer_json};

/// Undoes llama.cpp's permutation of Q or K projection rows. Its converter stores
/// `w.reshape(n_head, 2, d/2, cols).swapaxes(1, 2)` so that each head's rotary pairs
/// are adjacent (GGML's interleaved RoPE); Hugging Face's Llama rotates the two
/// halves of each head instead. So GGUF row `h·d + 2i + j` is HF row `h·d + j·d/2 + i`.
pub fn unpermute_rows(w: &[f32], rows: usize, n_head: usize) -> Result<Vec<f32>> {
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) || !w.len().is_multiple_of(rows.max(1)) {
        bail!("cannot un-permute {rows} rows into {n_head} heads of rotary pairs");
    }
    let cols = w.len() / rows;
    let d = rows / n_head;
    let half = d / 2;
    let mut out = vec![0f32; w.len()];
    out.par_chunks_mut(cols).enumerate().for_each(|(r, dst)| {
        let (h, rest) = (r / d, r % d);
        let (j, i) = (rest / half, rest % half);
        let src = h * d + 2 * i + j;
        dst.copy_from_slice(&w[src * cols..(src + 1) * cols]);
    });
    Ok(out)
}

/// The Hugging Face name of a llama GGUF tensor, and the number of heads to
/// un-permute its rows with (Q: attention heads, K: key/value heads).
fn hf_name(name: &str, n_head: usize, n_kv: usize) -> Option<(String, Option<usize>)> {
    let (stem, kind) = name.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let fixed = match stem {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some((format!("{f}.{kind}"), None));
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (hf, heads) = match part {
        "attn_norm" => ("input_layernorm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        "attn_q" => ("self_attn.q_proj", Some(n_head)),
        "attn_k" => ("self_attn.k_proj", Some(n_kv)),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}.{kind}"), heads))
}

/// The llama hyper-parameters read from the GGUF metadata.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaParams {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub vocab_size: usize,
    pub tie_word_embeddings: bool,
}

impl LlamaParams {
    /// Reads the `llama.*` keys (and the vocabulary size) of a llama GGUF.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let arch = g.req_str("general.architecture")?;
        if arch != "llama" {
            return Err(g.err(format_args!(
                "architecture '{arch}' is not supported (this importer writes llama only)"
            )));
        }
        let u = |k: &str| g.req_u64(&format!("llama.{k}")).map(|v| v as usize);
        let hidden_size = u("embedding_length")?;
        let num_attention_heads = u("attention.head_count")?;
        let num_key_value_heads = match g.get("llama.attention.head_count_kv") {
            Some(_) => u("attention.head_count_kv")?,
            None => num_attention_heads,
        };
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(g.err(format_args!(
                "{num_attention_heads} attention heads cannot share {num_key_value_heads} key/value heads"
            )));
        }
        let head_dim = match g.get("llama.attention.key_length") {
            Some(_) => u("attention.key_length")?,
            None => hidden_size / num_attention_heads,
        };
        let vocab_size = match g.get("llama.vocab_size") {
            Some(_) => u("vocab_size")?,
            None => g.req_strings("tokenizer.ggml.tokens")?.len(),
        };
        let rope_theta = match g.get("llama.rope.freq_base") {
            Some(_) => g.req_f64("llama.rope.freq_base")?,
            // llama.cpp's default when the key is absent.
            None => 10_000.0,
        };
        // Each layer has 9 weight tensors: a larger count is a damaged header, and
        // would make the checkpoint's table of tensors without end.
        let num_hidden_layers = u("block_count")?;
        if num_hidden_layers > g.tensors.len() / 9 {
            return Err(g.err(format_args!(
                "llama.block_count is {num_hidden_layers}, but the file has only {} tensors (9 a layer)",
                g.tensors.len()
            )));
        }
        Ok(Self {
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: g.req_f64("llama.attention.layer_norm_rms_epsilon")?,
            rope_theta,
            max_position_embeddings: u("context_length")?,
            vocab_size,
            tie_word_embeddings: g.tensor("output.weight").is_none(),
        })
    }
}

/// config.json of a `LlamaForCausalLM` (keys as transformers writes them; the rope
/// base under both the v4 and the v5 name, so either reader finds it).
pub fn llama_config(g: &Gguf, p: &LlamaParams) -> Result<Json> {
    let ids = special_ids(g)?;
    let mut c = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": p.hidden_size,
        "intermediate_size": p.intermediate_size,
        "num_hidden_layers": p.num_hidden_layers,
        "num_attention_heads": p.num_attention_heads,
        "num_key_value_heads": p.num_key_value_heads,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": p.rms_norm_eps,
        "rope_theta": p.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": p.rope_theta},
        "max_position_embeddings": p.max_position_embeddings,
        "vocab_size": p.vocab_size,
        "tie_word_embeddings": p.tie_word_embeddings,
        "attention_bias": g.tensor("blk.0.attn_q.bias").is_some(),
        "attention_dropout": 0.0,
        "mlp_bias": g.tensor("blk.0.ffn_up.bias").is_some(),
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": true,
        // transformers 5 reads `dtype`, older releases `torch_dtype`.
        "dtype": "float32",
        "torch_dtype": "float32",
    });
    for (name, key) in [
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("pad", "pad_token_id"),
    ] {
        if let Some(id) = ids.get(name) {
            c[key] = json!(id);
        }
    }
    Ok(c)
}

/// A dequantized tensor ready for safetensors (f32, little-endian bytes).
struct F32Tensor {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for &F32Tensor {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Dequantizes and renames every tensor (un-permuting Q and K), checking each name
/// and shape against the checkpoint's table (`shapes`) and that none is missing.
fn hf_tensors(
    g: &Gguf,
    p: &LlamaParams,
    shapes: &BTreeMap<String, Vec<i64>>,
) -> Result<BTreeMap<String, F32Tensor>> {
    let mut out = BTreeMap::new();
    for t in &g.tensors {
        let (name, heads) = hf_name(&t.name, p.num_attention_heads, p.num_key_value_heads)
            .ok_or_else(|| {
                g.err(format_args!(
                    "tensor '{}' has no Hugging Face Llama name",
                    t.name
                ))
            })?;
        let shape = t.shape();
        let Some(want) = shapes.get(&name) else {
            return Err(g.err(format_args!(
                "tensor '{}' ({name}) has no place in the llama its metadata describes ({} layers, no norm biases, biases on every projection or none)",
                t.name, p.num_hidden_layers
            )));
        };
        if want.iter().map(|&x| x as usize).ne(shape.iter().copied()) {
            return Err(g.err(format_args!(
                "tensor '{}' has shape {shape:?} but the metadata implies {want:?}",
                t.name
            )));
        }
        let mut w = g.dequantize(t)?;
        if let Some(h) = heads {
            w = unpermute_rows(&w, shape[0], h)
                .with_context(|| format!("{}: tensor '{}'", g.path().display(), t.name))?;
        }
        let mut bytes = vec![0u8; w.len() * 4];
        bytes
            .par_chunks_mut(4 * 4096)
            .zip(w.par_chunks(4096))
            .for_each(|(b, w)| {
                for (b, x) in b.chunks_exact_mut(4).zip(w) {
                    b.copy_from_slice(&x.to_le_bytes());
                }
            });
        if out
            .insert(name.clone(), F32Tensor { shape, bytes })
            .is_some()
        {
            return Err(g.err(format_args!("two tensors map to '{name}'")));
        }
    }
    if let Some(missing) = shapes.keys().find(|k| !out.contains_key(*k)) {
        return Err(g.err(format_args!(
            "has no tensor for {missing}, which a llama of {} layers has",
            p.num_hidden_layers
        )));
    }
    Ok(out)
}

/// Writes the Hugging Face layout of the llama GGUF `g` into the (existing, empty)
/// folder `dir`.
pub fn convert(g: &Gguf, dir: &Path) -> Result<()> {
    let p = LlamaParams::from_gguf(g)?;
    let config = llama_config(g, &p)?;
    // The checkpoint the written config.json describes, as the model reads it.
    let cfg = llama::Config::from_json(&dir.join("config.json"), &config).map_err(|e| {
        g.err(format_args!(
            "its metadata gives no valid Llama config: {e:#}"
        ))
    })?;
    let tokenizer = tokenizer_json(g)?;
    let (tok_cfg, special_map, gen) = side_configs(g, &p)?;
    let tensors = hf_tensors(g, &p, &llama::checkpoint_shapes(&cfg))?;
    let st = dir.join("model.safetensors");
    let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(
        tensors.iter().map(|(k, v)| (k.as_str(), v)),
        &Some(meta),
        &st,
    )
    .map_err(|e| anyhow!("{}: cannot write: {e:?}", st.display()))?;
    drop(tensors);
    let pretty = |v: &Json| serde_json::to_vec_pretty(v).expect("JSON values serialize");
    write_atomic(&dir.join("config.json"), &pretty(&config))?;
    write_atomic(&dir.join("generation_config.json"), &pretty(&gen))?;
    write_atomic(&dir.join("tokenizer_config.json"), &pretty(&tok_cfg))?;
    write_atomic(&dir.join("special_tokens_map.json"), &pretty(&special_map))?;
    // Compact: the vocabulary and merges are large and nobody reads them by eye.
    write_atomic(
        &dir.join("tokenizer.json"),
        &serde_json::to_vec(&tokenizer).expect("JSON values serialize"),
    )?;
    Ok(())
}

/// Bumped whenever the conversion's output changes, so that old imports are redone.
const IMPORT_VERSION: u32 = 1;

#[derive(Serialize)]
struct ImportParams {
    layout: &'static str,
    dtype: &'static str,
    import_version: u32,
}

/// The stage (and so the model folder's key) of importing `gguf`.
pub fn stage(gguf: &Path) -> Result<Stage> {
    let params = ImportParams {
        layout: "hf-llama",
        dtype: "float32",
        import_version: IMPORT_VERSION,
    };
    Stage::new("import", &params, &[gguf])
}

/// The `quark-import` stage: converts `gguf` into the Hugging Face layout at `out`,
/// content-hashed (a finished import of the same file is left alone) and atomic (a
/// crash leaves nothing under `out`). Returns `out`.
pub fn import_gguf(gguf: &Path, out: &Path) -> Result<PathBuf> {
    let stage = stage(gguf)?;
    if stage.is_done(out) {
        eprintln!("quark-import: {} is up to date", out.display());
        return Ok(out.to_owned());
    }
    stage.check_replaceable(out)?;
    let started = std::time::Instant::now();
    let g = Gguf::open(gguf)?;
    let dir = AtomicDir::create(out)?;
    convert(&g, dir.dir())?;
    let path = dir.commit(stage.meta())?;
    eprintln!(
        "quark-import: {} -> {} in {:.2} s",
        gguf.display(),
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::tokenizer::bytes_to_unicode;
    use super::*;
    use half::f16;

    /// llama.cpp's permute, written as its converter does it, as the reference.
    fn permute(w: &[f32], rows: usize, n_head: usize) -> Vec<f32> {
        let cols = w.len() / rows;
        let d = rows / n_head;
        let mut out = vec![0f32; w.len()];
        // out viewed as (h, i, j) with shape (n_head, d/2, 2) = w viewed as (h, j, i).
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..d / 2 {
                    let src = h * d + j * (d / 2) + i;
                    let dst = h * d + i * 2 + j;
                    out[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&w[src * cols..(src + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (rows, cols, heads) = (24, 3, 3);
        let w: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let p = permute(&w, rows, heads);
        assert_ne!(p, w);
        assert_eq!(unpermute_rows(&p, rows, heads).unwrap(), w);
        // Head 0 of 8 rows: GGUF rows 0..8 hold HF rows 0,4,1,5,2,6,3,7.
        let order: Vec<usize> = (0..8).map(|r| p[r * cols] as usize / cols).collect();
        assert_eq!(order, [0, 4, 1, 5, 2, 6, 3, 7]);
        assert!(unpermute_rows(&w, 10, 3).is_err());
    }

    #[test]
    fn hand_worked_blocks() {
        // Q4_1: d = 0.5, m = -1, byte j = (j+16 nibble) << 4 | (j nibble).
        let mut b = Vec::new();
        b.extend(f16::from_f32(0.5).to_le_bytes());
        b.extend(f16::from_f32(-1.0).to_le_bytes());
        for j in 0..16u8 {
            b.push(((15 - j) << 4) | j);
        }
        let w = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!(w[0], -1.0);
        assert_eq!(w[3], 0.5);
        assert_eq!(w[15], 6.5);
        assert_eq!(w[16], 6.5);
        assert_eq!(w[31], -1.0);
        // Q8_0: d = 0.25, q = -128, -1, 0, 1, 127, ...
        let mut b = Vec::new();
        b.extend(f16::from_f32(0.25).to_le_bytes());
        let qs: Vec<i8> = (0..32).map(|i| [-128, -1, 0, 1, 127][i % 5]).collect();
        b.extend(qs.iter().map(|&q| q as u8));
        let w = dequantize(GgmlType::Q8_0, &b, 32).unwrap();
        assert_eq!(&w[..5], &[-32.0, -0.25, 0.0, 0.25, 31.75]);
        // A wrong byte count is an error, not a panic.
        assert!(dequantize(GgmlType::Q8_0, &b[..33], 32).is_err());
        assert!(dequantize(GgmlType::Other(12), &b, 32).is_err());
    }

    #[test]
    fn tensor_names_map_to_hf() {
        let n = |s| hf_name(s, 9, 3);
        assert_eq!(
            n("token_embd.weight").unwrap().0,
            "model.embed_tokens.weight"
        );
        assert_eq!(
            n("blk.12.attn_k.weight").unwrap(),
            ("model.layers.12.self_attn.k_proj.weight".into(), Some(3))
        );
        assert_eq!(
            n("blk.0.attn_q.weight").unwrap(),
            ("model.layers.0.self_attn.q_proj.weight".into(), Some(9))
        );
        assert_eq!(
            n("blk.3.ffn_norm.weight").unwrap().0,
            "model.layers.3.post_attention_layernorm.weight"
        );
        assert!(n("rope_freqs.weight").is_none());
        assert!(n("blk.x.attn_q.weight").is_none());
    }

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let t = bytes_to_unicode();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'A' as usize], 'A');
        let set: std::collections::HashSet<_> = t.iter().collect();
        assert_eq!(set.len(), 256);
    }
}
