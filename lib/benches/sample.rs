//! Sampling throughput against transformers `generate` on the same CPU and threads:
//! SmolLM2-135M, 64 prompts of ../shared/data/rtp-nontoxic-1200.jsonl, 20 new tokens
//! (at least 3), top-p 0.9, batch 16. Prints generated tokens per second for
//! quark-sample's generator in f32 and bf16 and for transformers in f32, the ratios,
//! and peak memory (each configuration in its own process: this one for Rust, a
//! child for Python; the bf16 run follows the f32 one, so its peak includes it).
//!
//! `cargo bench -p quark --bench sample` (or `just bench`).

mod common;

use std::time::Instant;

use anyhow::{Context, Result};
use quark::model::Model;
use quark::prompts::read_prompts;
use quark::sample::{generate, SampleOptions};
use tch::{Device, Kind};

const PROMPTS: usize = 64;

fn main() -> Result<()> {
    let model_dir = common::model_dir()?;
    let threads = common::threads()?;
    let prompts_path = common::repo_root().join("../shared/data/rtp-nontoxic-1200.jsonl");
    let mut prompts = read_prompts(&prompts_path).context("the benchmark's prompts")?;
    prompts.truncate(PROMPTS);
    let opts = SampleOptions {
        condition: None,
        samples_per_prompt: 1,
        max_new_tokens: 20,
        min_new_tokens: 3,
        temperature: 1.0,
        top_p: 0.9,
        top_k: None,
        greedy: false,
        seed: 0,
        max_prompt_tokens: 256,
        shard: None,
        limit: None,
        iteration: 0,
        dtype: String::new(),
        batch_size: 16,
        progress: false,
    };
    println!(
        "sample: {} prompts, 20 new tokens, top-p 0.9, batch 16, {threads} threads",
        prompts.len()
    );
    let mut rust = Vec::new();
    for (name, kind) in [("f32", Kind::Float), ("bf16", Kind::BFloat16)] {
        let model = Model::load(&model_dir, Device::Cpu, kind)?;
        let opts = SampleOptions {
            dtype: name.into(),
            ..opts.clone()
        };
        generate(&model, &prompts[..16], &opts, "warm-up")?;
        let t = Instant::now();
        let rows = generate(&model, &prompts, &opts, "bench")?;
        let secs = t.elapsed().as_secs_f64();
        let tokens: usize = rows.iter().map(|r| r.completion_tokens.len()).sum();
        let tps = tokens as f64 / secs;
        println!("  quark-rs {name:>4}: {tps:8.1} tokens/s ({tokens} tokens in {secs:.2} s), peak {:.0} MiB", common::peak_mib());
        rust.push((name, tps));
    }
    let py = common::baseline(
        "generate",
        &[
            model_dir.as_os_str(),
            threads.to_string().as_ref(),
            prompts_path.as_os_str(),
        ],
    )?;
    let py_tps = py["tokens_per_s"].as_f64().context("tokens_per_s")?;
    println!(
        "  transformers f32: {py_tps:8.1} tokens/s ({} tokens in {:.2} s), peak {:.0} MiB",
        py["tokens"],
        py["seconds"].as_f64().unwrap_or(f64::NAN),
        py["peak_mib"].as_f64().unwrap_or(f64::NAN)
    );
    for (name, tps) in rust {
        println!(
            "  ratio quark-rs {name} / transformers f32: {:.2}x",
            tps / py_tps
        );
    }
    Ok(())
}
