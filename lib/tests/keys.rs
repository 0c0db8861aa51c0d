//! The content keys of every stage for fixed inputs and options, pinned: a key is a
//! promise (a finished output is never recomputed, and everything downstream is
//! named by it), so a refactoring that changes a stage's name, its parameters'
//! JSON or how inputs are hashed must show up here. The inputs are plain files:
//! the key hashes their bytes, whatever they hold.

use std::path::{Path, PathBuf};

use quark::device::DType;
use quark::fit::FitOptions;
use quark::pool::BinOptions;
use quark::sample::SampleOptions;
use quark::score::command::{CommandScorer, DEFAULT_TIMEOUT};
use quark::score::profanity::ProfanityScorer;
use quark::score::repetition::RepetitionScorer;
use quark::score::score_stage;

fn file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, bytes).unwrap();
    p
}

pub fn sample_options() -> SampleOptions {
    SampleOptions {
        condition: Some(0),
        samples_per_prompt: 2,
        max_new_tokens: 20,
        min_new_tokens: 3,
        temperature: 1.0,
        top_p: 0.9,
        top_k: None,
        greedy: false,
        seed: 7,
        max_prompt_tokens: 128,
        shard: Some((1, 4)),
        limit: None,
        iteration: 2,
        dtype: DType::Bf16,
        batch_size: 32,
        progress: false,
    }
}

pub fn fit_options() -> FitOptions {
    FitOptions {
        steps: 40,
        batch_size: 16,
        grad_accum: 2,
        lr: 3e-5,
        adam_eps: 1e-5,
        adam_betas: (0.9, 0.999),
        warmup_steps: 20,
        total_steps: 200,
        schedule: Default::default(),
        kl_coef: 0.05,
        entropy_coef: 0.06,
        adaptive_kl: None,
        max_grad_norm: Some(1.0),
        unlikelihood_coef: 0.0,
        control_lr_scale: 1.0,
        control_init: Default::default(),
        seed: 0,
        iteration: 2,
        dtype: DType::F32,
        gradient_checkpointing: true,
        progress: false,
    }
}

/// Every stage's key for the same fixed inputs, by stage.
fn keys() -> Vec<(&'static str, String)> {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = d.join("model");
    file(d, "model/config.json", b"{\"model_type\": \"llama\"}");
    file(d, "model/model.safetensors", b"weights");
    let policy = d.join("policy");
    file(d, "policy/model.safetensors", b"policy weights");
    file(d, "policy/trainer_state.json", b"{}");
    let prompts = file(d, "prompts.jsonl", b"{\"prompt\": {\"text\": \"Hello\"}}\n");
    let generations = file(d, "generations.parquet", b"generations");
    let scored = file(d, "scored.parquet", b"scored");
    let pool = file(d, "pool.parquet", b"pool");
    let gguf = file(d, "model.gguf", b"GGUF");
    let key = |s: quark::stage::Stage| s.key().to_owned();
    vec![
        (
            "generations",
            key(quark::sample::stage(&model, &prompts, &sample_options()).unwrap()),
        ),
        (
            "scored profanity",
            key(score_stage(&generations, &ProfanityScorer).unwrap()),
        ),
        (
            "scored repetition",
            key(score_stage(&generations, &RepetitionScorer).unwrap()),
        ),
        (
            "scored command",
            key(score_stage(
                &generations,
                &CommandScorer::new("python r.py", DEFAULT_TIMEOUT).unwrap(),
            )
            .unwrap()),
        ),
        (
            "pool",
            key(quark::pool::stage(
                std::slice::from_ref(&scored),
                Some(&pool),
                &BinOptions {
                    quantiles: 5,
                    max_pool_rows: None,
                    only_latest: false,
                },
            )
            .unwrap()),
        ),
        (
            "policy",
            key(quark::fit::stage(&pool, &policy, &model, &fit_options()).unwrap()),
        ),
        (
            "eval",
            key(quark::eval::stage(
                &[scored.clone(), generations.clone()],
                std::slice::from_ref(&pool),
                Some("toxicity"),
            )
            .unwrap()),
        ),
        ("import", key(quark::gguf::stage(&gguf).unwrap())),
        (
            "policy, numerals",
            key(quark::fit::stage(
                &pool,
                &policy,
                &model,
                &FitOptions {
                    control_init: quark::model::ControlInit::Numerals,
                    ..fit_options()
                },
            )
            .unwrap()),
        ),
    ]
}

/// A policy whose control tokens start elsewhere is another output; the default
/// start keeps the key it always had (pinned above).
#[test]
fn the_control_tokens_start_is_in_the_fit_key() {
    let got: std::collections::HashMap<_, _> = keys().into_iter().collect();
    assert_ne!(got["policy"], got["policy, numerals"]);
}

#[test]
fn every_stage_key_is_what_it_was() {
    let got = keys();
    for (stage, key) in &got {
        eprintln!("{stage}: {key}");
    }
    // Computed by the code of 75a9b13 (before the split into one concern a file)
    // with the same inputs and options.
    let pinned: [(&str, &str); 8] = [
        (
            "generations",
            "0647c59dc8c04b2aaa09d71c76a4241d5cab91c601049b3e3d2a20508695812d",
        ),
        (
            "scored profanity",
            "094faa6ba1836382de18838f652e731d5ee0d184511658ab7e75124f0aa93c8f",
        ),
        (
            "scored repetition",
            "e2de89f8f3029f7a692998c5cb7343140b3ae4a154f1b5313430c3b0911511d6",
        ),
        (
            "scored command",
            "cb3f6a4788336446f5868a2ea4f79a21a7930c2299832f87b314a7631b7606e6",
        ),
        (
            "pool",
            "a03b2391aa1ffa673965e564ae656522bd09304224693f93fda89524abb39c5b",
        ),
        (
            "policy",
            "cddd2aa32e38112c58f02d90602b31222f14cb12560effde09e952a5a43d88f6",
        ),
        (
            "eval",
            "75da2d8046771134043cf37b0ab2322a0a707dd7a9a8e883f52bb0006a70ec81",
        ),
        (
            "import",
            "42fd58b88999856569a0955112482854b6d73659bb2ddde2abf50a321a567b47",
        ),
    ];
    for ((stage, key), (s, want)) in got.iter().zip(pinned) {
        assert_eq!(*stage, s);
        assert_eq!(key, want, "the key of stage `{stage}` changed");
    }
}
