//! The tokenizer of a llama GGUF as Hugging Face files: tokenizer.json (byte-level
//! BPE from the GGUF's vocabulary and merges), the special token ids and the small
//! tokenizer and generation configs.

use std::collections::BTreeMap;

use anyhow::Result;
use serde_json::{json, Value as Json};

use super::file::{Gguf, Value};
use super::LlamaParams;

/// The special token ids the GGUF names.
pub(crate) fn special_ids(g: &Gguf) -> Result<BTreeMap<&'static str, u64>> {
    let mut ids = BTreeMap::new();
    for (name, key) in [
        ("bos", "tokenizer.ggml.bos_token_id"),
        ("eos", "tokenizer.ggml.eos_token_id"),
        ("unk", "tokenizer.ggml.unknown_token_id"),
        ("pad", "tokenizer.ggml.padding_token_id"),
    ] {
        if g.get(key).is_some() {
            ids.insert(name, g.req_u64(key)?);
        }
    }
    Ok(ids)
}

/// GPT-2's map from bytes to printable characters, in which byte-level BPE
/// vocabularies spell their tokens.
pub(crate) fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        table[b as usize] = if printable {
            char::from(b)
        } else {
            n += 1;
            char::from_u32(255 + n).expect("valid char")
        };
    }
    table
}

/// tokenizer.json for the GGUF's byte-level BPE vocabulary (`tokenizer.ggml.model`
/// = gpt2): vocabulary and merges as the file gives them, control tokens (type 3)
/// as special added tokens and user-defined ones (type 4) as plain added tokens,
/// the ByteLevel decoder, and the pre-tokenizer the `tokenizer.ggml.pre` names.
pub fn tokenizer_json(g: &Gguf) -> Result<Json> {
    let model = g.req_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(g.err(format_args!(
            "tokenizer model '{model}' is not supported (this importer builds byte-level BPE, 'gpt2', only)"
        )));
    }
    let tokens = g.req_strings("tokenizer.ggml.tokens")?;
    let merges = g.req_strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(Value::as_i64).collect::<Option<Vec<_>>>())
            .ok_or_else(|| g.err("metadata 'tokenizer.ggml.token_type' is not an integer array"))?,
    };
    if types.len() != tokens.len() {
        return Err(g.err(format_args!(
            "{} token types for {} tokens",
            types.len(),
            tokens.len()
        )));
    }
    let table = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = table.iter().copied().collect();
    let mut vocab = serde_json::Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    for (id, (&tok, &ty)) in tokens.iter().zip(&types).enumerate() {
        let in_alphabet = tok.chars().all(|ch| alphabet.contains(&ch));
        // A token outside the byte alphabet cannot come out of byte-level BPE: spell
        // its UTF-8 bytes as the alphabet does (as transformers' GGUF reader does).
        let spelled = if in_alphabet {
            tok.to_owned()
        } else {
            tok.bytes().map(|b| table[b as usize]).collect()
        };
        if vocab.insert(spelled.clone(), json!(id)).is_some() {
            return Err(g.err(format_args!(
                "token {id} ({tok:?}) appears twice in the vocabulary"
            )));
        }
        // 3 = control (<|endoftext|>, <|im_start|>...), 4 = user-defined: matched
        // whole in the text, never split by BPE.
        if (ty == 3 && in_alphabet) || ty == 4 {
            added.push(json!({
                "id": id, "content": spelled, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": ty == 3,
            }));
        }
    }
    for m in &merges {
        if m.split(' ').count() != 2 {
            return Err(g.err(format_args!(
                "merge {m:?} is not two tokens separated by a space"
            )));
        }
    }
    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre_tokenizer = match pre {
        // GPT-2's split alone.
        "default" | "gpt2" | "gpt-2" => byte_level,
        // Every digit its own piece first (llama.cpp's `\p{N}` step for these), then
        // GPT-2's split: SmolLM's and StarCoder's tokenizer.json say exactly this.
        "smollm" | "starcoder" | "refact" => json!({
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level],
        }),
        other => {
            return Err(g.err(format_args!(
                "pre-tokenizer '{other}' (tokenizer.ggml.pre) is not supported (known: gpt2, smollm, starcoder, refact)"
            )))
        }
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    }))
}

/// tokenizer_config.json, special_tokens_map.json and generation_config.json.
pub(crate) fn side_configs(g: &Gguf, p: &LlamaParams) -> Result<(Json, Json, Json)> {
    let tokens = g.req_strings("tokenizer.ggml.tokens")?;
    let ids = special_ids(g)?;
    let mut map = serde_json::Map::new();
    for (name, id) in &ids {
        let tok = tokens.get(*id as usize).ok_or_else(|| {
            g.err(format_args!(
                "{name} token id {id} is outside the vocabulary of {}",
                tokens.len()
            ))
        })?;
        map.insert(format!("{name}_token"), json!(tok));
    }
    let mut tok_cfg = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": g.get("tokenizer.ggml.add_bos_token").and_then(Value::as_bool).unwrap_or(false),
        "add_eos_token": g.get("tokenizer.ggml.add_eos_token").and_then(Value::as_bool).unwrap_or(false),
        "add_prefix_space": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": p.max_position_embeddings,
    });
    for (k, v) in &map {
        tok_cfg[k] = v.clone();
    }
    if let Some(t) = g.get("tokenizer.chat_template").and_then(Value::as_str) {
        tok_cfg["chat_template"] = json!(t);
    }
    let mut gen = json!({});
    for (name, key) in [
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("pad", "pad_token_id"),
    ] {
        if let Some(id) = ids.get(name) {
            gen[key] = json!(id);
        }
    }
    Ok((tok_cfg, Json::Object(map), gen))
}
