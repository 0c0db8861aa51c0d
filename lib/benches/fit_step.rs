//! One Quark training step against the same loss written with PyTorch in Python
//! (bench/baseline.py fit_step, f32) on the same CPU and threads: SmolLM2-135M, batch
//! 16, prompt + completion 48 tokens (20 completion tokens): policy forward and
//! backward, reference forward without gradients, Adam. Prints seconds per step,
//! tokens per second, the ratios and peak memory, for quark-fit's step in f32 and in
//! bf16 (f32 master weights and Adam state).
//!
//! `cargo bench -p quark --bench fit_step` (or `just bench`).

mod common;

use std::time::Instant;

use anyhow::{Context, Result};
use quark::fit::{learning_rate, quark_loss, Adam, TrainRow};
use quark::model::Model;
use tch::{Device, Kind};

const ROWS: usize = 16;
const PROMPT: usize = 28;
const COMPLETION: usize = 20;
const STEPS: usize = 3;

fn main() -> Result<()> {
    let model_dir = common::model_dir()?;
    let threads = common::threads()?;
    println!("fit step: batch {ROWS}, {PROMPT} prompt + {COMPLETION} completion tokens, {threads} threads");
    let mut rust = Vec::new();
    for (name, kind) in [("f32", Kind::Float), ("bf16", Kind::BFloat16)] {
        let mut policy = Model::load(&model_dir, Device::Cpu, Kind::Float)?;
        policy.add_control_tokens(5, 0)?;
        let mut reference = Model::load(&model_dir, Device::Cpu, kind)?;
        reference.var_store_mut().freeze();
        let mut adam = Adam::new(&policy, (0.9, 0.999), 1e-5, None, kind != Kind::Float)?;
        if kind != Kind::Float {
            policy.var_store_mut().set_kind(kind);
        }
        // Token ids drawn as the Python baseline draws them: uniform over the vocabulary.
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
            let terms = quark_loss(&policy, &reference, &rows, 0.05, 0.06, 0.0)?;
            (&terms.loss_sum / terms.tokens as f64).backward();
            adam.step(
                learning_rate(1e-5, step as u64, 0, 100),
                step as u64 + 1,
                1.0,
            );
            times.push(t.elapsed().as_secs_f64());
        }
        // The first step pays for allocations; the best of the rest is the figure.
        let best = times[1..].iter().copied().fold(f64::INFINITY, f64::min);
        let tps = (ROWS * (PROMPT + COMPLETION)) as f64 / best;
        println!(
            "  quark-rs {name:>4}: {best:6.2} s/step, {tps:7.1} tokens/s, peak {:.0} MiB",
            common::peak_mib()
        );
        rust.push((name, best));
    }
    let py = common::baseline(
        "fit_step",
        &[model_dir.as_os_str(), threads.to_string().as_ref()],
    )?;
    let py_s = py["seconds"].as_f64().context("seconds")?;
    println!(
        "  PyTorch      f32: {py_s:6.2} s/step, {:7.1} tokens/s, peak {:.0} MiB",
        py["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
        py["peak_mib"].as_f64().unwrap_or(f64::NAN)
    );
    for (name, s) in rust {
        println!(
            "  speed-up quark-rs {name} over PyTorch f32: {:.2}x",
            py_s / s
        );
    }
    Ok(())
}
