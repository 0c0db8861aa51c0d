//! Sampling throughput against transformers `generate` on the same CPU and threads:
//! SmolLM2-135M, 64 prompts of ../shared/data/rtp-nontoxic-1200.jsonl, 20 new tokens
//! (at least 3), top-p 0.9, batch 16. Prints generated tokens per second and peak
//! memory for quark-sample's generator in f32 and in bf16 and for transformers in
//! f32 and (where the CPU computes bf16 natively) in bf16, each in a process of its
//! own, and the ratios in the same dtype.
//!
//! `cargo bench -p quark --bench sample` (or `just bench`).

mod common;

use std::time::Instant;

use anyhow::{Context, Result};
use quark::model::Model;
use quark::prompts::read_prompts;
use quark::sample::{generate, SampleOptions};
use serde_json::json;
use tch::Device;

const PROMPTS: usize = 64;

fn main() -> Result<()> {
    let model_dir = common::model_dir()?;
    let threads = common::threads()?;
    let prompts_path = common::repo_root().join("../shared/data/rtp-nontoxic-1200.jsonl");
    let dtypes = ["f32", "bf16"];
    let Some(first) = common::per_dtype_children(&dtypes)? else {
        // A child: one dtype.
        let (name, kind) = common::child_kind()?;
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
            dtype: name.parse()?,
            batch_size: 16,
            progress: false,
        };
        let model = Model::load(&model_dir, Device::Cpu, kind)?;
        generate(&model, &prompts[..16], &opts, "warm-up")?;
        let t = Instant::now();
        let rows = generate(&model, &prompts, &opts, "bench")?;
        let secs = t.elapsed().as_secs_f64();
        let tokens: usize = rows.iter().map(|r| r.completion_tokens.len()).sum();
        let line = json!({"tokens_per_s": tokens as f64 / secs, "tokens": tokens, "seconds": secs, "peak_mib": common::peak_mib()});
        println!("{line}");
        return Ok(());
    };
    common::print_cpu(threads);
    let threads_arg = threads.to_string();
    let peer_dtypes = common::peer_dtypes();
    let peers_once = || -> Result<Vec<common::Named>> {
        let mut peers = Vec::new();
        for d in &peer_dtypes {
            let args = [
                model_dir.as_os_str(),
                threads_arg.as_ref(),
                prompts_path.as_os_str(),
                d.as_ref(),
            ];
            peers.push((
                format!("transformers {d}"),
                common::baseline("generate", &args)?,
            ));
        }
        Ok(peers)
    };
    let (rust, peers) = common::measure_rounds(&dtypes, first, peers_once, "tokens_per_s", false)?;
    println!(
        "sample: {PROMPTS} prompts, 20 new tokens, top-p 0.9, batch 16, {threads} threads, best of {} rounds",
        common::rounds()?
    );
    let row = |name: &str, v: &serde_json::Value| {
        println!(
            "  {name:<17} {:8.1} tokens/s ({} tokens in {:.2} s), peak {:.0} MiB",
            v["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            v["tokens"],
            v["seconds"].as_f64().unwrap_or(f64::NAN),
            v["peak_mib"].as_f64().unwrap_or(f64::NAN)
        )
    };
    for (d, v) in dtypes.iter().zip(&rust) {
        row(&format!("quark-rs {d}"), v);
    }
    for (name, v) in &peers {
        row(name, v);
    }
    common::print_peer_ratios(&dtypes, &rust, &peers, "tokens_per_s", false)
}
