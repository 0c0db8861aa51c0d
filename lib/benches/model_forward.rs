//! Forward throughput of the model module against transformers, on the same CPU
//! with the same thread count: tokens per second for a 16 x 64 batch, this code in
//! f32 and bf16 and transformers in f32, printed with their ratios. Also prints how
//! far the bf16 logits are from the f32 ones on that model.
//!
//! `cargo bench -p quark --bench model_forward` (or `just bench`). The model is
//! $QUARK_BENCH_MODEL, else the imported default `data/models/smollm2-135m`, else a
//! random Llama of SmolLM2-135M's shape made by tests/python/bench_forward.py.
//! $QUARK_BENCH_THREADS sets the thread count (default: all cores), and
//! $QUARK_BENCH_ITERS the timed forwards per configuration (default 3).

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use quark::model::Model;
use tch::{Device, Kind, Tensor};

const BATCH: i64 = 16;
const SEQ: i64 = 64;

fn python(args: &[&str]) -> Result<String> {
    common::run_python("tests/python/bench_forward.py", args)
}

fn env_num(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v}: not a number")),
        Err(_) => Ok(default),
    }
}

/// Tokens per second of this crate's forward and the last logits.
fn bench_rust(dir: &Path, kind: Kind, ids: &Tensor, iters: usize) -> Result<(f64, Tensor)> {
    let model = Model::load(dir, Device::Cpu, kind)?;
    let mask = ids.ones_like();
    let _g = tch::no_grad_guard();
    let mut logits = model.forward(ids, &mask)?;
    let start = Instant::now();
    for _ in 0..iters {
        logits = model.forward(ids, &mask)?;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(((BATCH * SEQ) as f64 * iters as f64 / secs, logits))
}

fn main() -> Result<()> {
    let threads = env_num(
        "QUARK_BENCH_THREADS",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    )?;
    let iters = env_num("QUARK_BENCH_ITERS", 3)?;
    tch::set_num_threads(threads as i32);
    let scratch = tempfile::tempdir()?;
    let dir = match std::env::var_os("QUARK_BENCH_MODEL") {
        Some(d) => PathBuf::from(d),
        None if common::repo_root()
            .join("data/models/smollm2-135m/config.json")
            .is_file() =>
        {
            common::repo_root().join("data/models/smollm2-135m")
        }
        None => {
            let d = scratch.path().join("random-smollm2-shape");
            eprintln!("model_forward: no imported model; a random one of SmolLM2-135M's shape");
            python(&["make", d.to_str().context("temp path is not UTF-8")?])?;
            d
        }
    };
    eprintln!(
        "model_forward: {} on {threads} threads, {BATCH} x {SEQ} tokens, {iters} iterations",
        dir.display()
    );

    tch::manual_seed(0);
    let vocab = Model::load(&dir, Device::Cpu, Kind::Float)?.vocab_size();
    let ids = Tensor::f_randint(vocab, [BATCH, SEQ], (Kind::Int64, Device::Cpu))?;
    let (f32_tps, f32_logits) = bench_rust(&dir, Kind::Float, &ids, iters)?;
    let (bf16_tps, bf16_logits) = bench_rust(&dir, Kind::BFloat16, &ids, iters)?;
    let dir_str = dir.to_str().context("model path is not UTF-8")?;
    let py = python(&[
        "run",
        dir_str,
        &threads.to_string(),
        &BATCH.to_string(),
        &SEQ.to_string(),
        &iters.to_string(),
    ])?;
    let py: serde_json::Value = serde_json::from_str(py.trim())?;
    let hf_tps = py["tokens_per_s"]
        .as_f64()
        .context("bench_forward.py printed no tokens_per_s")?;

    let diff = (&bf16_logits - &f32_logits).abs().max().double_value(&[]);
    let scale = f32_logits.abs().max().double_value(&[]);
    let top = bf16_logits
        .argmax(-1, false)
        .eq_tensor(&f32_logits.argmax(-1, false))
        .to_kind(Kind::Float)
        .mean(Kind::Float)
        .double_value(&[]);
    println!(
        "forward, {BATCH} x {SEQ} tokens, {threads} threads, {}",
        dir.display()
    );
    println!(
        "  quark f32          {f32_tps:>9.0} tokens/s   {:.2}x transformers",
        f32_tps / hf_tps
    );
    println!(
        "  quark bf16         {bf16_tps:>9.0} tokens/s   {:.2}x transformers",
        bf16_tps / hf_tps
    );
    println!("  transformers f32   {hf_tps:>9.0} tokens/s   1.00x");
    println!("  bf16 vs f32 logits: max |diff| {diff:.4} (logit scale {scale:.2}), top-1 agreement {top:.3}");
    Ok(())
}
