//! One Quark training step against the same loss written with PyTorch in Python
//! (bench/baseline.py fit_step, f32) on the same CPU and threads: SmolLM2-135M, batch
//! 16, prompt + completion 48 tokens (20 completion tokens): policy forward and
//! backward, reference forward without gradients, Adam. Prints seconds per step,
//! tokens per second, peak memory and the speed-ups, for quark-fit's step in f32 and
//! in bf16 (f32 master weights and Adam state), each also with gradient
//! checkpointing, each in a process of its own.
//!
//! `cargo bench -p quark --bench fit_step` (or `just bench`).

mod common;

use std::time::Instant;

use anyhow::Result;
use quark::fit::{learning_rate, quark_loss, Adam, Backprop, LossWeights, TrainRow};
use quark::model::Model;
use serde_json::json;
use tch::{Device, Kind};

const ROWS: usize = 16;
const PROMPT: usize = 28;
const COMPLETION: usize = 20;
const STEPS: usize = 3;

/// The variants measured, each in a process of its own.
const VARIANTS: [&str; 4] = ["f32", "bf16", "f32+checkpointing", "bf16+checkpointing"];

/// Seconds of the best step after the first, in the dtype of this process.
fn measure(model_dir: &std::path::Path, kind: Kind, checkpoint: bool) -> Result<f64> {
    let mut policy = Model::load(model_dir, Device::Cpu, Kind::Float)?;
    policy.add_control_tokens(5, 0)?;
    let mut reference = Model::load(model_dir, Device::Cpu, kind)?;
    reference.var_store_mut().freeze();
    let mut adam = Adam::new(&policy, (0.9, 0.999), 1e-5, None, kind != Kind::Float)?;
    if kind != Kind::Float {
        policy.var_store_mut().set_kind(kind);
    }
    // Token ids uniform over the vocabulary, as the Python baseline draws them.
    let vocab = reference.vocab_size() as u32;
    let mut state = 0x9e37_79b9_u64;
    let mut next = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 33) as u32 % vocab
    };
    let rows: Vec<TrainRow> = (0..ROWS)
        .map(|i| TrainRow {
            quantile: (i % 5) as u32,
            prompt: (0..PROMPT).map(|_| next()).collect(),
            completion: (0..COMPLETION).map(|_| next()).collect(),
        })
        .collect();
    let mut times = Vec::new();
    for step in 0..STEPS {
        let t = Instant::now();
        let weights = LossWeights {
            kl: 0.05,
            entropy: 0.06,
            unlikelihood: 0.0,
        };
        let backprop = Backprop {
            scale: 1.0 / (ROWS * COMPLETION) as f64,
            checkpoint,
        };
        quark_loss(&policy, &reference, &rows, weights, Some(backprop))?;
        adam.step(
            learning_rate(1e-5, step as u64, 0, 100),
            step as u64 + 1,
            1.0,
        );
        times.push(t.elapsed().as_secs_f64());
    }
    // The first step pays for allocations; the best of the rest is the figure.
    Ok(times[1..].iter().copied().fold(f64::INFINITY, f64::min))
}

fn main() -> Result<()> {
    let model_dir = common::model_dir()?;
    let threads = common::threads()?;
    let tokens = (ROWS * (PROMPT + COMPLETION)) as f64;
    let Some(rust) = common::per_dtype_children(&VARIANTS)? else {
        let (variant, kind) = common::child_kind()?;
        let s = measure(&model_dir, kind, variant.ends_with("+checkpointing"))?;
        println!(
            "{}",
            json!({"seconds": s, "tokens_per_s": tokens / s, "peak_mib": common::peak_mib()})
        );
        return Ok(());
    };
    let py = common::baseline(
        "fit_step",
        &[model_dir.as_os_str(), threads.to_string().as_ref()],
    )?;
    println!("fit step: batch {ROWS}, {PROMPT} prompt + {COMPLETION} completion tokens, {threads} threads");
    let row = |name: &str, v: &serde_json::Value| {
        println!(
            "  {name:<28} {:6.2} s/step, {:7.1} tokens/s, peak {:.0} MiB",
            v["seconds"].as_f64().unwrap_or(f64::NAN),
            v["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            v["peak_mib"].as_f64().unwrap_or(f64::NAN)
        )
    };
    for (name, v) in VARIANTS.iter().zip(&rust) {
        row(&format!("quark-rs {name}"), v);
    }
    row("PyTorch f32", &py);
    common::print_ratios(
        &VARIANTS,
        &rust,
        &py,
        "seconds",
        true,
        "speed-up over PyTorch f32,",
    )
}
