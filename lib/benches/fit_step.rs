//! Quark training steps against the same loss written in PyTorch (bench/baseline.py,
//! the head on the completion positions only, fused Adam) on the same CPU and
//! threads, SmolLM2-135M, batch 16: policy forward and backward, the frozen
//! reference's forward, Adam. Two workloads:
//!
//! - the bench's batch: 16 rows of 28 prompt + 20 completion tokens drawn uniformly
//!   over the vocabulary; quark-fit's step in f32 and bf16 (f32 master weights and
//!   Adam state), each also with gradient checkpointing; the best step after the
//!   first;
//! - the default task's own pool (`$QUARK_BENCH_POOL`, else the first pool of
//!   data/runs/toxicity, which `just iterate` makes): its real prompt lengths (the
//!   peer pads each batch to its longest row), the rows quark-fit's first steps draw
//!   in its order, PyTorch reading the same file; the mean of 9 steps after a first one (a fit runs 80 to 200: its
//!   steady state, not its first allocations).
//!
//! PyTorch runs in f32 and, where the CPU computes bf16 natively, under bf16 autocast
//! (its best configuration there); every figure comes from a process of its own, and
//! the speed-ups compare equal dtypes. `cargo bench -p quark --bench fit_step` (or
//! `just bench`); `QUARK_BENCH_ONLY=f32+pool` measures one variant and its peer.

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use quark::fit::batches::batch_indices;
use quark::fit::{learning_rate, quark_loss, training_rows, Adam, Backprop, LossWeights, TrainRow};
use quark::model::Model;
use serde_json::json;
use tch::{Device, Kind};

const ROWS: usize = 16;
const PROMPT: usize = 28;
const COMPLETION: usize = 20;
const STEPS: usize = 3;
/// Steps on the pool: one that pays for allocations, then the measured ones.
const POOL_STEPS: usize = 10;
/// The default task's seed (pipelines/toxicity.env), which orders its fit's rows.
const POOL_SEED: u64 = 0;

/// The variants measured, each in a process of its own.
const VARIANTS: [&str; 6] = [
    "f32",
    "bf16",
    "f32+checkpointing",
    "bf16+checkpointing",
    "f32+pool",
    "bf16+pool",
];

/// The bench's batch: token ids uniform over the vocabulary, as the baseline draws.
fn random_batch(vocab: u32) -> Vec<Vec<TrainRow>> {
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
    vec![rows; STEPS]
}

/// The pool's first POOL_STEPS batches in quark-fit's order, as row indices into its
/// trained rows, and those rows.
fn pool_batches(pool: &Path) -> Result<(Vec<Vec<usize>>, Vec<TrainRow>)> {
    let (_, _, rows) = training_rows(pool)?;
    let order = (0..POOL_STEPS)
        .map(|s| batch_indices(rows.len(), POOL_SEED, (s * ROWS) as u64, ROWS))
        .collect();
    Ok((order, rows))
}

/// $QUARK_BENCH_POOL, else the first pool the default run's manifest records.
fn pool_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("QUARK_BENCH_POOL") {
        return Some(PathBuf::from(p));
    }
    let root = common::repo_root();
    let manifest = std::fs::read_to_string(root.join("data/runs/toxicity/manifest.tsv")).ok()?;
    manifest
        .lines()
        .map(|l| l.split('\t').collect::<Vec<_>>())
        .find(|f| f.len() == 3 && f[1] == "bin")
        .map(|f| root.join(f[2]))
        .filter(|p| p.is_file())
}

/// Seconds per step of `batches` in the dtype `kind`: the best after the first for
/// the bench's (identical) batches, the mean after the first for the pool's.
fn measure(
    model_dir: &Path,
    kind: Kind,
    checkpoint: bool,
    pool: Option<&Path>,
) -> Result<(f64, f64)> {
    let mut policy = Model::load(model_dir, Device::Cpu, Kind::Float)?;
    policy.add_control_tokens(5, 0)?;
    let mut reference = Model::load(model_dir, Device::Cpu, kind)?;
    reference.var_store_mut().freeze();
    let mut adam = Adam::new(&policy, (0.9, 0.999), 1e-5, None, kind != Kind::Float)?;
    if kind != Kind::Float {
        policy.var_store_mut().set_kind(kind);
    }
    let batches = match pool {
        Some(p) => {
            let (order, rows) = pool_batches(p)?;
            order
                .iter()
                .map(|b| b.iter().map(|&i| rows[i].clone()).collect())
                .collect()
        }
        None => random_batch(reference.vocab_size() as u32),
    };
    let mut times = Vec::new();
    for (step, rows) in batches.iter().enumerate() {
        let t = Instant::now();
        let tokens: usize = rows.iter().map(|r| r.completion.len()).sum();
        let weights = LossWeights {
            kl: 0.05,
            entropy: 0.06,
            unlikelihood: 0.0,
        };
        let backprop = Backprop {
            scale: 1.0 / tokens as f64,
            checkpoint,
        };
        quark_loss(&policy, &reference, rows, weights, Some(backprop))?;
        adam.step(
            learning_rate(1e-5, step as u64, 0, 100),
            step as u64 + 1,
            1.0,
        );
        times.push(t.elapsed().as_secs_f64());
    }
    let rest = &times[1..];
    let seconds = match pool {
        Some(_) => rest.iter().sum::<f64>() / rest.len() as f64,
        None => rest.iter().copied().fold(f64::INFINITY, f64::min),
    };
    let tokens = batches[1..]
        .iter()
        .flatten()
        .map(|r| r.prompt.len() + r.completion.len())
        .sum::<usize>() as f64
        / rest.len() as f64;
    Ok((seconds, tokens / seconds))
}

fn main() -> Result<()> {
    let model_dir = common::model_dir()?;
    let threads = common::threads()?;
    let pool = pool_path();
    // $QUARK_BENCH_ONLY=f32+pool (say) measures that variant and its peer alone (to
    // profile one pair).
    let only = std::env::var("QUARK_BENCH_ONLY").ok();
    let variants: Vec<&str> = VARIANTS
        .iter()
        .copied()
        .filter(|v| pool.is_some() || !v.ends_with("+pool"))
        .filter(|v| only.as_deref().is_none_or(|o| o == *v))
        .collect();
    let wanted = |dtype: &str, on_pool: bool| {
        variants
            .iter()
            .any(|v| v.split('+').next() == Some(dtype) && v.ends_with("+pool") == on_pool)
    };
    let Some(first) = common::per_dtype_children(&variants)? else {
        let (variant, kind) = common::child_kind()?;
        let on_pool = variant.ends_with("+pool");
        let pool = on_pool.then(|| pool.context("no pool")).transpose()?;
        let (s, tps) = measure(
            &model_dir,
            kind,
            variant.ends_with("+checkpointing"),
            pool.as_deref(),
        )?;
        println!(
            "{}",
            json!({"seconds": s, "tokens_per_s": tps, "peak_mib": common::peak_mib()})
        );
        return Ok(());
    };
    common::print_cpu(threads);
    let dtypes = common::peer_dtypes();
    let threads_arg = threads.to_string();
    let order_file = tempfile::NamedTempFile::new()?;
    if let Some(p) = &pool {
        let (order, _) = pool_batches(p)?;
        std::fs::write(order_file.path(), json!({ "batches": order }).to_string())?;
    }
    let peers_once = || -> Result<Vec<common::Named>> {
        let mut peers = Vec::new();
        for d in dtypes.iter().filter(|d| wanted(d, false)) {
            let args = [model_dir.as_os_str(), threads_arg.as_ref(), d.as_ref()];
            peers.push((format!("PyTorch {d}"), common::baseline("fit_step", &args)?));
        }
        for (p, d) in pool.iter().flat_map(|p| {
            dtypes
                .iter()
                .filter(|d| wanted(d, true))
                .map(move |d| (p, d))
        }) {
            let args = [
                model_dir.as_os_str(),
                threads_arg.as_ref(),
                d.as_ref(),
                p.as_os_str(),
                order_file.path().as_os_str(),
            ];
            peers.push((
                format!("PyTorch {d}+pool"),
                common::baseline("fit_pool", &args)?,
            ));
        }
        Ok(peers)
    };
    let (rust, peers) = common::measure_rounds(&variants, first, peers_once, "seconds", true)?;
    println!(
        "fit step: batch {ROWS}, {PROMPT} prompt + {COMPLETION} completion tokens, {threads} threads, best of {} rounds",
        common::rounds()?
    );
    match &pool {
        Some(p) => println!(
            "  +pool: {} steps of the default task's pool {} after a first, mean",
            POOL_STEPS - 1,
            p.display()
        ),
        None => {
            println!("  +pool: skipped, no pool (run `just iterate` once, or set QUARK_BENCH_POOL)")
        }
    }
    let row = |name: &str, v: &serde_json::Value| {
        println!(
            "  {name:<30} {:6.2} s/step, {:7.1} tokens/s, peak {:.0} MiB",
            v["seconds"].as_f64().unwrap_or(f64::NAN),
            v["tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            v["peak_mib"].as_f64().unwrap_or(f64::NAN)
        )
    };
    for (name, v) in variants.iter().zip(&rust) {
        row(&format!("quark-rs {name}"), v);
    }
    for (name, v) in &peers {
        row(name, v);
    }
    common::print_peer_ratios(&variants, &rust, &peers, "seconds", true)
}
