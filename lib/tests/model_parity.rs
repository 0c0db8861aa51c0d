//! Parity of the GPT-2 and Llama implementations with PyPI transformers.
//!
//! tests/python/make_tiny.py builds tiny random checkpoints (GPT-2 with a tied head;
//! Llama with grouped-query attention, tied, and untied + llama3 rope scaling +
//! sharded) and the transformers logits of a left-padded batch. Everything here is
//! compared to those logits: the full forward, the cached forward token by token,
//! and a checkpoint with control tokens saved by Rust and read back by both
//! libraries (tests/python/check_saved.py). The venv's python is found through
//! QUARK_VENV (default `<repo>/.venv`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use quark::model::rowwise::decoding;
use quark::model::{control_token_text, ControlInit, ControlTokens, Model};
use quark::testing::python;
use tch::{Device, Kind, Tensor};

const MODELS: [&str; 3] = ["gpt2", "llama-tied", "llama-untied"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run_python(script: &str, args: &[&Path]) -> String {
    let out = Command::new(python())
        .arg(repo_root().join("tests/python").join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (set QUARK_VENV): {e}", python().display()));
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The tiny checkpoints and their references, made once per test process.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        run_python("make_tiny.py", &[dir.path()]);
        dir
    })
    .path()
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

struct Reference {
    ids: Tensor,
    mask: Tensor,
    logits: Tensor,
}

fn reference(name: &str) -> Reference {
    let mut r = read(&fixtures().join(format!("{name}.ref.safetensors")));
    Reference {
        ids: r.remove("input_ids").unwrap(),
        mask: r.remove("attention_mask").unwrap(),
        logits: r.remove("logits").unwrap(),
    }
}

fn load(name: &str, kind: Kind) -> Model {
    Model::load(&fixtures().join(name), Device::Cpu, kind).unwrap()
}

/// Max |a - b| over the positions where `mask` is 1 (padding logits mean nothing).
fn max_diff_on_mask(a: &Tensor, b: &Tensor, mask: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    let m = mask.to_kind(Kind::Float).unsqueeze(-1);
    ((a - b).abs() * m).max().double_value(&[])
}

fn real_len(mask: &Tensor, row: i64) -> i64 {
    mask.get(row).sum(Kind::Int64).int64_value(&[])
}

#[test]
fn tokenizer_matches_python_and_round_trips() {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("tokens.json")).unwrap()).unwrap();
    let model = load("gpt2", Kind::Float);
    let texts = v["texts"].as_array().unwrap();
    for (text, ids) in texts.iter().zip(v["ids"].as_array().unwrap()) {
        let text = text.as_str().unwrap();
        let want: Vec<u32> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let enc = model.tokenizer().encode(text, true).unwrap();
        assert_eq!(enc.get_ids(), want, "{text}");
        assert_eq!(model.tokenizer().decode(&want, false).unwrap(), text);
    }
}

#[test]
fn full_forward_with_left_padding_matches_transformers() {
    let _g = tch::no_grad_guard();
    for name in MODELS {
        let r = reference(name);
        let model = load(name, Kind::Float);
        let logits = model.forward(&r.ids, &r.mask).unwrap();
        let diff = max_diff_on_mask(&logits, &r.logits, &r.mask);
        eprintln!("{name}: f32 max |rust - transformers| = {diff:e}");
        assert!(diff < 1e-4, "{name}: max |rust - transformers| = {diff}");
    }
}

#[test]
fn left_padding_gives_the_unpadded_logits() {
    let _g = tch::no_grad_guard();
    for name in MODELS {
        let r = reference(name);
        let model = load(name, Kind::Float);
        let padded = model.forward(&r.ids, &r.mask).unwrap();
        assert!(
            bool::try_from(padded.isfinite().all()).unwrap(),
            "{name}: padding rows must stay finite"
        );
        let (b, t) = r.ids.size2().unwrap();
        for row in 0..b {
            let n = real_len(&r.mask, row);
            let ids = r.ids.get(row).narrow(0, t - n, n).unsqueeze(0);
            let alone = model.forward(&ids, &ids.ones_like()).unwrap();
            let diff = (alone.get(0) - padded.get(row).narrow(0, t - n, n))
                .abs()
                .max()
                .double_value(&[]);
            assert!(
                diff < 1e-5,
                "{name} row {row}: padded vs unpadded differ by {diff}"
            );
            // Unpadded, token by token through the cache (the mask-free attention paths).
            let mut cache = model.new_cache();
            for s in 0..n {
                let step = model
                    .forward_cached(
                        &ids.narrow(1, s, 1),
                        &ids.narrow(1, 0, s + 1).ones_like(),
                        &mut cache,
                    )
                    .unwrap();
                let diff = (step.get(0).get(0) - alone.get(0).get(s))
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(
                    diff < 1e-5,
                    "{name} row {row} step {s}: cached unpadded differs by {diff}"
                );
            }
        }
    }
}

/// Feeds the batch one column at a time through the cache, dropping row 1 half-way
/// (select_rows), and compares every step with the reference: through libtorch's
/// attention, and as the sampler decodes (a batch-invariant cache inside
/// `rowwise::decoding`, where the decode kernels run the products and the attention).
#[test]
fn cached_forward_token_by_token_matches_transformers() {
    let _g = tch::no_grad_guard();
    for name in MODELS {
        let r = reference(name);
        let model = load(name, Kind::Float);
        let (_, t) = r.ids.size2().unwrap();
        for sampler in [false, true] {
            let mut cache = model.new_cache();
            if sampler {
                cache = cache.batch_invariant();
            }
            let mut rows = Tensor::from_slice(&[0i64, 1, 2]);
            let mut steps = Vec::new();
            for s in 0..t {
                if s == t / 2 {
                    let keep = Tensor::from_slice(&[0i64, 2]);
                    cache.select_rows(&keep).unwrap();
                    rows = rows.index_select(0, &keep);
                }
                let ids = r.ids.index_select(0, &rows).narrow(1, s, 1);
                let mask = r.mask.index_select(0, &rows).narrow(1, 0, s + 1);
                let mut step = || model.forward_cached(&ids, &mask, &mut cache);
                let logits = if sampler { decoding(step) } else { step() }.unwrap();
                assert_eq!(logits.size()[1], 1);
                let want = r.logits.index_select(0, &rows).narrow(1, s, 1);
                let m = r.mask.index_select(0, &rows).narrow(1, s, 1);
                steps.push(max_diff_on_mask(&logits, &want, &m));
            }
            assert_eq!(cache.len(), t);
            let worst = steps.iter().cloned().fold(0.0, f64::max);
            assert!(
                worst < 1e-4,
                "{name} (as the sampler decodes: {sampler}): cached step diffs {steps:?}"
            );
        }

        // A prompt in one call, then one token: the same as the full forward.
        let mut cache = model.new_cache();
        let _ = model
            .forward_cached(
                &r.ids.narrow(1, 0, t - 1),
                &r.mask.narrow(1, 0, t - 1),
                &mut cache,
            )
            .unwrap();
        let last = model
            .forward_cached(&r.ids.narrow(1, t - 1, 1), &r.mask, &mut cache)
            .unwrap();
        let diff = max_diff_on_mask(
            &last,
            &r.logits.narrow(1, t - 1, 1),
            &r.mask.narrow(1, t - 1, 1),
        );
        assert!(diff < 1e-4, "{name}: prompt + one token differs by {diff}");
    }
}

/// The input embedding variable of a model.
fn embedding(m: &Model) -> Tensor {
    m.var_store()
        .variables()
        .into_iter()
        .find(|(k, _)| k.ends_with("wte.weight") || k.ends_with("embed_tokens.weight"))
        .unwrap()
        .1
}

/// The reference batch with one control token put in front of each row's prompt,
/// still left padded.
fn with_control_tokens(r: &Reference, ct: ControlTokens) -> (Tensor, Tensor) {
    let q = [ct.first_id, ct.first_id + 4, ct.first_id + 1];
    let (b, t) = r.ids.size2().unwrap();
    let ids = Tensor::zeros([b, t + 1], (Kind::Int64, Device::Cpu));
    let mask = ids.zeros_like();
    for row in 0..b {
        let n = real_len(&r.mask, row);
        let seq = Tensor::cat(
            &[
                Tensor::from_slice(&[q[row as usize]]),
                r.ids.get(row).narrow(0, t - n, n),
            ],
            0,
        );
        ids.get(row).narrow(0, t - n, n + 1).copy_(&seq);
        let _ = mask.get(row).narrow(0, t - n, n + 1).fill_(1);
    }
    (ids, mask)
}

/// `numerals`: control token k's embedding row starts as the mean of the rows of
/// the tokens that spell k, whatever the seed; the old rows stay as they were and
/// the K rows are distinct.
#[test]
fn numeral_control_tokens_start_as_the_tokens_that_spell_them() {
    let _g = tch::no_grad_guard();
    for name in MODELS {
        let mut model = load(name, Kind::Float);
        let before = model.vocab_size();
        let old = embedding(&model).copy();
        model
            .add_control_tokens_with(5, 1, ControlInit::Numerals)
            .unwrap();
        let mut other_seed = load(name, Kind::Float);
        other_seed
            .add_control_tokens_with(5, 2, ControlInit::Numerals)
            .unwrap();
        assert!(embedding(&model).equal(&embedding(&other_seed)), "{name}");
        let rows = embedding(&model);
        assert!(
            rows.narrow(0, 0, before).equal(&old),
            "{name}: old rows moved"
        );
        for q in 0..5u32 {
            let ids: Vec<i64> = model
                .tokenizer()
                .encode(q.to_string(), false)
                .unwrap()
                .get_ids()
                .iter()
                .map(|&t| i64::from(t))
                .collect();
            assert!(!ids.is_empty() && ids.iter().all(|&t| t < before), "{name}");
            let want =
                old.index_select(0, &Tensor::from_slice(&ids))
                    .mean_dim(0, false, Kind::Float);
            let got = rows.get(before + i64::from(q));
            let diff = (&got - &want).abs().max().double_value(&[]);
            assert!(
                diff < 1e-6,
                "{name}: <|quark:{q}|> is {diff} from its spelling"
            );
        }
        // Distinct rows: the network can tell the tokens apart from the first step.
        let new_rows = rows.narrow(0, before, 5);
        let gaps = new_rows.unsqueeze(0) - new_rows.unsqueeze(1);
        let dist = gaps.square().sum_dim_intlist(2, false, Kind::Float).sqrt();
        let nearest = (dist + Tensor::eye(5, (Kind::Float, Device::Cpu)) * 1e9)
            .min()
            .double_value(&[]);
        assert!(nearest > 0.0, "{name}: two control tokens start equal");
    }
}

/// Control tokens added in Rust, saved, then read by transformers and by Rust again:
/// all three agree, and the tokens are special tokens in both tokenizers.
#[test]
fn control_tokens_survive_save_and_reload_in_both_libraries() {
    let _g = tch::no_grad_guard();
    let work = tempfile::tempdir().unwrap();
    let mut py_args: Vec<PathBuf> = Vec::new();
    let mut expected = Vec::new();
    for name in MODELS {
        let r = reference(name);
        let mut model = load(name, Kind::Float);
        let before = model.vocab_size();
        let old_logits = model.forward(&r.ids, &r.mask).unwrap();
        model.add_control_tokens(5, 42).unwrap();
        let ct = model.control_tokens().unwrap();
        assert_eq!((ct.k, ct.first_id), (5, before), "{name}");
        assert_eq!(model.vocab_size(), before + 5);
        let q3 = model
            .tokenizer()
            .encode(control_token_text(3), false)
            .unwrap();
        assert_eq!(
            q3.get_ids(),
            [(before + 3) as u32],
            "{name}: one special token"
        );
        assert!(
            model.add_control_tokens(5, 42).is_err(),
            "adding twice must fail"
        );

        // Old tokens keep their logits; the new head columns are only appended.
        let logits = model.forward(&r.ids, &r.mask).unwrap();
        assert_eq!(logits.size()[2], before + 5);
        let diff = max_diff_on_mask(&logits.narrow(2, 0, before), &old_logits, &r.mask);
        assert!(diff < 1e-6, "{name}: resizing changed old logits by {diff}");

        // The new rows are seeded: the same seed gives the same rows, another seed others.
        let mut again = load(name, Kind::Float);
        again.add_control_tokens(5, 42).unwrap();
        assert!(
            embedding(&model).equal(&embedding(&again)),
            "{name}: same seed, same rows"
        );
        let mut other = load(name, Kind::Float);
        other.add_control_tokens(5, 43).unwrap();
        assert!(
            !embedding(&model).equal(&embedding(&other)),
            "{name}: seed ignored"
        );
        let new_rows = embedding(&model).narrow(0, before, 5);
        assert!(bool::try_from(new_rows.isfinite().all()).unwrap());
        // Each new row is the vocabulary's mean plus 1% of its spread per dimension
        // (a neutral prefix, not a random token): within 6 such spreads everywhere,
        // and far nearer the mean than the real rows are.
        let old_rows = embedding(&model).narrow(0, 0, before);
        let mean = old_rows.mean_dim(0, false, Kind::Float);
        let std = old_rows.std_dim(0, true, false);
        let z = ((&new_rows - &mean) / (&std * quark::model::control::INIT_NOISE)).abs();
        let worst = z.max().double_value(&[]);
        assert!(
            worst < 6.0,
            "{name}: a new row is {worst} noise spreads from the mean"
        );
        assert!(worst > 0.0, "{name}: no noise: the K rows would be equal");
        let dist = |rows: &Tensor| {
            (rows - &mean)
                .square()
                .sum_dim_intlist(1, false, Kind::Float)
                .sqrt()
                .mean(Kind::Float)
                .double_value(&[])
        };
        assert!(
            dist(&new_rows) < 0.05 * dist(&old_rows),
            "{name}: new rows as far from the mean as real ones"
        );

        let (ids, mask) = with_control_tokens(&r, ct);
        let want = model.forward(&ids, &mask).unwrap();

        let saved = work.path().join(name);
        model.save(&saved).unwrap();
        let quark: serde_json::Value =
            serde_json::from_slice(&std::fs::read(saved.join("quark.json")).unwrap()).unwrap();
        assert_eq!(quark["control_tokens"], 5);
        let reloaded = Model::load(&saved, Device::Cpu, Kind::Float).unwrap();
        assert_eq!(reloaded.control_tokens(), Some(ct));
        let got = reloaded.forward(&ids, &mask).unwrap();
        let diff = max_diff_on_mask(&got, &want, &mask);
        assert!(diff < 1e-6, "{name}: Rust reload differs by {diff}");

        let inputs = work.path().join(format!("{name}.in.safetensors"));
        let out = work.path().join(format!("{name}.out.safetensors"));
        Tensor::write_safetensors(&[("input_ids", &ids), ("attention_mask", &mask)], &inputs)
            .unwrap();
        py_args.extend([saved, inputs, out.clone()]);
        expected.push((name, want, mask, out, ct, before));
    }
    let args: Vec<&Path> = py_args.iter().map(PathBuf::as_path).collect();
    let stdout = run_python("check_saved.py", &args);
    let lines: Vec<&str> = stdout.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(lines.len(), MODELS.len(), "{stdout}");
    for ((name, want, mask, out, ct, before), line) in expected.into_iter().zip(lines) {
        let py = read(&out).remove("logits").unwrap();
        let diff = max_diff_on_mask(&py, &want, &mask);
        assert!(
            diff < 1e-4,
            "{name}: transformers on the saved checkpoint differs by {diff}"
        );
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let hello = v["ids"].as_array().unwrap();
        assert_eq!(
            hello.first().unwrap().as_i64(),
            Some(ct.first_id),
            "{name}: {line}"
        );
        assert_eq!(
            hello.last().unwrap().as_i64(),
            Some(ct.first_id + 1),
            "{name}: {line}"
        );
        assert_eq!(v["vocab"].as_i64(), Some(before + 5), "{name}: {line}");
    }
}

/// bf16 weights. Against transformers running the same checkpoint in bf16 the
/// logits are bit-identical here (same libtorch kernels, same rounding points);
/// the bound allows one bf16 rounding step of the logit (8 significant bits:
/// scale / 128), since another CPU or BLAS may sum in another order. Against the
/// f32 reference the difference is the cost of bf16 itself (a few percent of the
/// logit scale after two layers), so it gets a loose bound, and the top token must
/// still agree almost everywhere.
#[test]
fn bf16_weights_match_transformers_in_bf16() {
    let _g = tch::no_grad_guard();
    for name in MODELS {
        let r = reference(name);
        let bf16_ref = read(&fixtures().join(format!("{name}.ref.safetensors")))
            .remove("logits_bf16")
            .unwrap();
        let model = load(name, Kind::BFloat16);
        assert_eq!(embedding(&model).kind(), Kind::BFloat16);
        let logits = model.forward(&r.ids, &r.mask).unwrap();
        assert_eq!(logits.kind(), Kind::Float);
        let scale = r.logits.abs().max().double_value(&[]);
        let vs_bf16 = max_diff_on_mask(&logits, &bf16_ref, &r.mask);
        let vs_f32 = max_diff_on_mask(&logits, &r.logits, &r.mask);
        let same_top = logits
            .argmax(-1, false)
            .eq_tensor(&r.logits.argmax(-1, false));
        let m = r.mask.ne(0);
        let agree = same_top.logical_and(&m).sum(Kind::Float).double_value(&[])
            / m.sum(Kind::Float).double_value(&[]);
        eprintln!(
            "{name}: bf16 vs transformers bf16 {vs_bf16:.4}, vs f32 {vs_f32:.4} \
             (logit scale {scale:.2}), top-1 agreement with f32 {agree:.3}"
        );
        assert!(
            vs_bf16 <= scale / 128.0,
            "{name}: bf16 vs transformers bf16: {vs_bf16}"
        );
        assert!(vs_f32 < 0.05 * scale, "{name}: bf16 vs f32: {vs_f32}");
        assert!(agree > 0.9, "{name}: top-1 agreement {agree}");
    }
}

/// Copies a fixture model into a fresh folder, applying `edit` to its config.json.
fn edited_copy(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixtures().join(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    dir
}

fn load_error(dir: &Path) -> String {
    let err = match Model::load(dir, Device::Cpu, Kind::Float) {
        Ok(_) => panic!("{}: load must fail", dir.display()),
        Err(e) => e,
    };
    let msg = format!("{err:#}");
    assert!(!msg.contains('\n'), "one line: {msg}");
    msg
}

#[test]
fn missing_config_key_names_the_file_and_key() {
    let dir = edited_copy("gpt2", |c| {
        c.as_object_mut().unwrap().remove("n_embd");
    });
    let msg = load_error(dir.path());
    assert!(
        msg.contains("config.json") && msg.contains("n_embd"),
        "{msg}"
    );
    let dir = edited_copy("llama-tied", |c| {
        c.as_object_mut().unwrap().remove("num_hidden_layers");
    });
    let msg = load_error(dir.path());
    assert!(
        msg.contains("config.json") && msg.contains("num_hidden_layers"),
        "{msg}"
    );
}

#[test]
fn unknown_architecture_names_the_file() {
    let dir = edited_copy("gpt2", |c| c["model_type"] = "bert".into());
    let msg = load_error(dir.path());
    assert!(msg.contains("config.json") && msg.contains("bert"), "{msg}");
    let dir = edited_copy("llama-tied", |c| {
        c["architectures"] = serde_json::json!(["LlamaForSequenceClassification"])
    });
    let msg = load_error(dir.path());
    assert!(
        msg.contains("config.json") && msg.contains("LlamaForSequenceClassification"),
        "{msg}"
    );
}

#[test]
fn shape_mismatch_names_the_file_and_tensor() {
    let dir = edited_copy("gpt2", |c| c["vocab_size"] = 401.into());
    let msg = load_error(dir.path());
    assert!(
        msg.contains("model.safetensors") && msg.contains("transformer.wte.weight"),
        "{msg}"
    );
    // Sharded: the error names the shard that holds the tensor.
    let dir = edited_copy("llama-untied", |c| c["intermediate_size"] = 100.into());
    let msg = load_error(dir.path());
    assert!(
        msg.contains("-of-00007.safetensors") && msg.contains("mlp.gate_proj.weight"),
        "{msg}"
    );
}

/// The trainer optimises `var_store().trainable_variables()`: every one of them must
/// get a gradient from the loss, the resized embedding (and untied head) included,
/// and the control-token rows must receive gradient when the tokens are used.
#[test]
fn gradients_reach_every_variable_after_adding_control_tokens() {
    for name in MODELS {
        let r = reference(name);
        let mut model = load(name, Kind::Float);
        model.add_control_tokens(3, 1).unwrap();
        let ct = model.control_tokens().unwrap();
        let vars = model.var_store().trainable_variables();
        assert_eq!(vars.len(), model.var_store().variables().len());
        let (ids, mask) = with_control_tokens(&r, ControlTokens { k: 5, ..ct });
        // Row 1 uses first_id + 4, beyond K = 3 here: keep to rows 0 and 2.
        let rows = Tensor::from_slice(&[0i64, 2]);
        let (ids, mask) = (ids.index_select(0, &rows), mask.index_select(0, &rows));
        let logits = model.forward(&ids, &mask).unwrap();
        let loss = logits.log_softmax(-1, Kind::Float).mean(Kind::Float);
        loss.backward();
        for v in &vars {
            let g = v.grad();
            assert!(g.defined(), "{name}: a variable got no gradient");
            assert_eq!(g.size(), v.size());
        }
        let emb = embedding(&model);
        let g = emb.grad().narrow(0, ct.first_id, 1).abs().sum(Kind::Float);
        assert!(
            g.double_value(&[]) > 0.0,
            "{name}: <|quark:0|> row got no gradient"
        );
    }
}

/// The original GPT-2 checkpoints name their tensors without the `transformer.`
/// prefix that transformers writes today (`h.0.attn.c_attn.weight`); both load.
#[test]
fn gpt2_checkpoint_without_transformer_prefix_loads() {
    let _g = tch::no_grad_guard();
    let dir = edited_copy("gpt2", |_| {});
    let file = dir.path().join("model.safetensors");
    let renamed: Vec<(String, Tensor)> = Tensor::read_safetensors(&file)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k.trim_start_matches("transformer.").to_owned(), t))
        .collect();
    assert!(renamed.iter().any(|(k, _)| k == "h.0.attn.c_attn.weight"));
    Tensor::write_safetensors(&renamed, &file).unwrap();
    let model = Model::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    let r = reference("gpt2");
    let logits = model.forward(&r.ids, &r.mask).unwrap();
    let diff = max_diff_on_mask(&logits, &r.logits, &r.mask);
    assert!(diff < 1e-4, "old key names: {diff}");
}

#[test]
fn the_cuda_half_of_libtorch_loads_on_demand() {
    // The venv's torch is a CUDA build. The programs do not link its CUDA half; once
    // it is loaded, a CUDA tensor fails (on a machine without a GPU) for want of a
    // GPU, not for want of CUDA kernels.
    assert!(quark::model::load_cuda_backend());
    if !tch::Cuda::is_available() {
        let err = Tensor::f_zeros([1], (Kind::Float, Device::Cuda(0)))
            .expect_err("no GPU here")
            .to_string();
        // Without it: "Could not run 'aten::empty.memory_format' with arguments from
        // the 'CUDA' backend"; with it: "Found no NVIDIA driver on your system".
        assert!(!err.contains("'CUDA' backend"), "{err}");
    }
}

/// The Llama checkpoint table ([`llama::checkpoint_shapes`], which the GGUF import
/// checks against) is what a Llama model reads and writes: tied and untied,
/// every key with its shape.
#[test]
fn llama_checkpoint_table_is_what_the_model_reads_and_writes() {
    use quark::model::llama;
    for name in ["llama-tied", "llama-untied"] {
        let dir = quark::testing::tiny_models().join(name);
        let config_path = dir.join("config.json");
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
        let table =
            llama::checkpoint_shapes(&llama::Config::from_json(&config_path, &config).unwrap());
        let model = Model::load(&dir, Device::Cpu, Kind::Float).unwrap();
        let out = tempfile::tempdir().unwrap();
        model.save(out.path()).unwrap();
        let saved: std::collections::BTreeMap<String, Vec<i64>> =
            Tensor::read_safetensors(out.path().join("model.safetensors"))
                .unwrap()
                .into_iter()
                .map(|(k, t)| (k, t.size()))
                .collect();
        assert_eq!(saved, table, "{name}");
    }
}
