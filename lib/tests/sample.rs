//! Sampling: the drawn distribution is the softmax with temperature, top-k and
//! top-p applied; greedy decoding with the cache equals the argmax continuation
//! without it; control tokens condition the input and are never emitted; the output
//! is byte-identical across batch sizes, and shards add up to the whole run.

use std::path::{Path, PathBuf};

use quark::model::Model;
use quark::sample::{draw, generate, sample_file, sampling_distribution, RowRng, SampleOptions};
use quark::schema::{read_table, GenerationRow, PromptRow};
use quark::testing;
use tch::{Device, Kind, Tensor};

fn options() -> SampleOptions {
    SampleOptions {
        condition: None,
        samples_per_prompt: 3,
        max_new_tokens: 6,
        min_new_tokens: 2,
        temperature: 1.0,
        top_p: 1.0,
        top_k: None,
        greedy: false,
        seed: 7,
        max_prompt_tokens: 64,
        shard: None,
        limit: None,
        iteration: 0,
        dtype: quark::device::DType::F32,
        batch_size: 16,
        progress: false,
    }
}

/// Pearson's chi-square of `counts` against `expected` probabilities.
fn chi_square(counts: &[u64], expected: &[f64]) -> f64 {
    let n: u64 = counts.iter().sum();
    counts
        .iter()
        .zip(expected)
        .filter(|(_, &p)| p > 0.0)
        .map(|(&c, &p)| {
            let e = p * n as f64;
            (c as f64 - e).powi(2) / e
        })
        .sum()
}

fn empirical(
    logits: &[f32],
    masked: &[usize],
    t: f64,
    k: Option<usize>,
    p: f64,
    draws: usize,
) -> Vec<u64> {
    let dist = sampling_distribution(logits, masked, t, k, p);
    let mut rng = RowRng::new(1, "chi", 0);
    let mut counts = vec![0u64; logits.len()];
    for _ in 0..draws {
        counts[draw(&dist, rng.uniform()).0] += 1;
    }
    counts
}

/// Softmax of logits / t with everything outside `keep` removed.
fn truncated_softmax(logits: &[f32], t: f64, keep: &[usize]) -> Vec<f64> {
    let mut p = vec![0.0; logits.len()];
    let z: f64 = keep.iter().map(|&i| (logits[i] as f64 / t).exp()).sum();
    for &i in keep {
        p[i] = (logits[i] as f64 / t).exp() / z;
    }
    p
}

const LOGITS: [f32; 8] = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0];

#[test]
fn sampled_frequencies_match_the_softmax_with_temperature() {
    let draws = 40_000;
    let counts = empirical(&LOGITS, &[], 0.7, None, 1.0, draws);
    let expected = truncated_softmax(&LOGITS, 0.7, &(0..8).collect::<Vec<_>>());
    // 7 degrees of freedom: the 99.9% quantile is 24.3.
    let chi = chi_square(&counts, &expected);
    assert!(chi < 24.3, "chi-square {chi}: {counts:?} vs {expected:?}");
}

#[test]
fn top_k_and_masked_ids_are_never_drawn_and_the_rest_follow_the_softmax() {
    // Masked id 7 (the largest logit) and top-3 of the rest: ids 0, 1, 2.
    let counts = empirical(&LOGITS, &[7], 1.0, Some(3), 1.0, 30_000);
    assert!(counts[3..].iter().all(|&c| c == 0), "{counts:?}");
    let expected = truncated_softmax(&LOGITS, 1.0, &[0, 1, 2]);
    let chi = chi_square(&counts, &expected);
    assert!(chi < 13.8, "chi-square {chi} (2 dof, 99.9%: 13.8)"); // 2 degrees of freedom
}

#[test]
fn top_p_keeps_the_smallest_nucleus_reaching_p() {
    // Softmax of LOGITS: id 7 has 0.48, id 0 0.18, id 1 0.11, id 2 0.065 ...
    // p = 0.75: 0.48 + 0.18 = 0.66 < 0.75, + 0.11 = 0.77 >= 0.75: nucleus {7, 0, 1}.
    let full = truncated_softmax(&LOGITS, 1.0, &(0..8).collect::<Vec<_>>());
    assert!(full[7] + full[0] < 0.75 && full[7] + full[0] + full[1] >= 0.75);
    let dist = sampling_distribution(&LOGITS, &[], 1.0, None, 0.75);
    let ids: Vec<usize> = dist.iter().map(|d| d.0).collect();
    assert_eq!(ids, vec![7, 0, 1]);
    let counts = empirical(&LOGITS, &[], 1.0, None, 0.75, 30_000);
    let chi = chi_square(&counts, &truncated_softmax(&LOGITS, 1.0, &[7, 0, 1]));
    assert!(chi < 13.8, "chi-square {chi}");
}

#[test]
fn row_streams_are_reproducible_and_distinct() {
    let a: Vec<f64> = (0..5)
        .map({
            let mut r = RowRng::new(3, "p", 0);
            move |_| r.uniform()
        })
        .collect();
    let b: Vec<f64> = (0..5)
        .map({
            let mut r = RowRng::new(3, "p", 0);
            move |_| r.uniform()
        })
        .collect();
    let c = RowRng::new(3, "p", 1).uniform();
    assert_eq!(a, b);
    assert_ne!(a[0], c);
    assert!(a.iter().all(|&u| (0.0..1.0).contains(&u)));
}

fn tiny() -> PathBuf {
    testing::tiny_models().join("llama-tied")
}

fn prompts() -> Vec<PromptRow> {
    [
        "Hello world",
        "The capital of France is",
        "A quick brown fox jumps over the lazy dog; the dog",
        "fn main() {",
        "Café",
    ]
    .iter()
    .map(|t| PromptRow {
        prompt_id: quark::prompts::prompt_id(t),
        prompt: t.to_string(),
    })
    .collect()
}

#[test]
fn greedy_with_the_cache_equals_the_argmax_continuation_without_it() {
    let model = Model::load(&tiny(), Device::Cpu, Kind::Float).unwrap();
    let opts = SampleOptions {
        greedy: true,
        samples_per_prompt: 1,
        min_new_tokens: 0,
        ..options()
    };
    let rows = generate(&model, &prompts(), &opts, "m").unwrap();
    let eos = model.eos_token_id();
    for r in &rows {
        // Recompute: full forward over the growing sequence, argmax of the last logits.
        let mut seq: Vec<i64> = r.prompt_tokens.iter().map(|&t| t as i64).collect();
        let mut expect = Vec::new();
        for _ in 0..opts.max_new_tokens {
            let ids = Tensor::from_slice(&seq).view([1, -1]);
            let mask = ids.ones_like();
            let logits = tch::no_grad(|| model.forward(&ids, &mask)).unwrap();
            let next = logits.select(1, -1).argmax(-1, false).int64_value(&[0]);
            expect.push(next as u32);
            seq.push(next);
            if Some(next) == eos {
                break;
            }
        }
        assert_eq!(r.completion_tokens, expect, "prompt {:?}", r.prompt);
        assert!(r.token_logprobs.iter().all(|&l| l <= 0.0));
        assert!((r.logprob - r.token_logprobs.iter().map(|&l| l as f64).sum::<f64>()).abs() < 1e-6);
    }
}

#[test]
fn control_tokens_condition_the_input_and_are_never_emitted() {
    let mut model = Model::load(&tiny(), Device::Cpu, Kind::Float).unwrap();
    model.add_control_tokens(5, 0).unwrap();
    let c = model.control_tokens().unwrap();
    // The argmax over the whole vocabulary after `prefix` + the prompt.
    let argmax_after = |model: &Model, prefix: Option<i64>, prompt: &[u32]| -> i64 {
        let seq: Vec<i64> = prefix
            .into_iter()
            .chain(prompt.iter().map(|&t| t as i64))
            .collect();
        let ids = Tensor::from_slice(&seq).view([1, -1]);
        let logits = tch::no_grad(|| model.forward(&ids, &ids.ones_like())).unwrap();
        logits.select(1, -1).argmax(-1, false).int64_value(&[0])
    };
    // Make the control tokens the most likely next tokens: the tied head grows with
    // the embedding, so rows 5 times the currently most likely token's row win
    // wherever that token's logit is positive. They must still never be sampled.
    let hello = model
        .tokenizer()
        .encode("Hello world", true)
        .unwrap()
        .get_ids()
        .to_vec();
    let top = argmax_after(&model, None, &hello);
    tch::no_grad(|| {
        let vars = model.var_store().variables();
        let emb = vars
            .iter()
            .find(|(n, _)| n.contains("embed_tokens"))
            .unwrap()
            .1;
        let row = emb.get(top) * 5.0;
        for id in c.ids() {
            emb.get(id).copy_(&row);
        }
    });
    assert!(
        c.ids().contains(&argmax_after(&model, None, &hello)),
        "a control token is now the most likely"
    );

    let opts = SampleOptions {
        samples_per_prompt: 4,
        ..options()
    };
    let plain = generate(&model, &prompts(), &opts, "m").unwrap();
    let conditioned = generate(
        &model,
        &prompts(),
        &SampleOptions {
            condition: Some(0),
            ..opts.clone()
        },
        "m",
    )
    .unwrap();
    let other = generate(
        &model,
        &prompts(),
        &SampleOptions {
            condition: Some(4),
            ..opts.clone()
        },
        "m",
    )
    .unwrap();
    for rows in [&plain, &conditioned, &other] {
        assert_eq!(rows.len(), 20);
        for r in rows.iter() {
            assert!(
                r.completion_tokens
                    .iter()
                    .all(|&t| !c.ids().contains(&(t as i64))),
                "{r:?}"
            );
        }
    }
    assert!(conditioned.iter().all(|r| r.condition == Some(0)));
    assert!(plain.iter().all(|r| r.condition.is_none()));
    // The stored prompt tokens are the prompt's own, without the control token.
    assert_eq!(plain[0].prompt_tokens, conditioned[0].prompt_tokens);

    // The control token is in the model's input: greedy decoding conditioned on
    // `<|quark:q|>` equals the argmax continuation of [control, prompt] computed
    // token by token without the cache (control tokens masked), and differs from
    // the unconditioned continuation.
    let greedy = SampleOptions {
        greedy: true,
        samples_per_prompt: 1,
        min_new_tokens: 0,
        ..options()
    };
    for q in [0u32, 4] {
        let rows = generate(
            &model,
            &prompts(),
            &SampleOptions {
                condition: Some(q),
                ..greedy.clone()
            },
            "m",
        )
        .unwrap();
        for r in &rows {
            let mut seq: Vec<i64> = std::iter::once(c.first_id + q as i64)
                .chain(r.prompt_tokens.iter().map(|&t| t as i64))
                .collect();
            let mut expect = Vec::new();
            for _ in 0..greedy.max_new_tokens {
                let ids = Tensor::from_slice(&seq).view([1, -1]);
                let logits = tch::no_grad(|| model.forward(&ids, &ids.ones_like()))
                    .unwrap()
                    .select(1, -1);
                let _ = logits
                    .narrow(1, c.first_id, c.k as i64)
                    .fill_(f64::NEG_INFINITY);
                let next = logits.argmax(-1, false).int64_value(&[0]);
                expect.push(next as u32);
                seq.push(next);
                if Some(next) == model.eos_token_id() {
                    break;
                }
            }
            assert_eq!(
                r.completion_tokens, expect,
                "condition {q}, prompt {:?}",
                r.prompt
            );
        }
    }
    let unconditioned = generate(&model, &prompts(), &greedy, "m").unwrap();
    let conditioned = generate(
        &model,
        &prompts(),
        &SampleOptions {
            condition: Some(0),
            ..greedy.clone()
        },
        "m",
    )
    .unwrap();
    let tokens = |rows: &[GenerationRow]| {
        rows.iter()
            .map(|r| r.completion_tokens.clone())
            .collect::<Vec<_>>()
    };
    assert_ne!(tokens(&unconditioned), tokens(&conditioned));

    let too_high = generate(
        &model,
        &prompts(),
        &SampleOptions {
            condition: Some(5),
            ..opts
        },
        "m",
    );
    assert!(format!("{:#}", too_high.unwrap_err()).contains("control tokens 0..4"));
}

fn write_prompts(dir: &Path) -> PathBuf {
    let path = dir.join("prompts.jsonl");
    let lines: Vec<String> = prompts()
        .iter()
        .map(|p| serde_json::json!({"text": p.prompt}).to_string())
        .collect();
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[test]
fn output_is_byte_identical_across_batch_sizes_and_shards_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = write_prompts(dir.path());
    let run = |name: &str, opts: SampleOptions| {
        sample_file(
            &tiny(),
            &prompts,
            &opts,
            Device::Cpu,
            &dir.path().join(name),
        )
        .unwrap()
    };
    // In both dtypes: bf16 runs other kernels, which must be batch-invariant too.
    for dtype in ["bf16", "f32"] {
        let files: Vec<PathBuf> = [1, 3, 16]
            .iter()
            .map(|&b| {
                run(
                    &format!("{dtype}-b{b}.parquet"),
                    SampleOptions {
                        batch_size: b,
                        dtype: dtype.parse().unwrap(),
                        ..options()
                    },
                )
            })
            .collect();
        let full = read_table::<GenerationRow>(&files[2]).unwrap();
        for (file, b) in files.iter().zip([1, 3, 16]) {
            // Rows first (a readable difference), then every byte.
            for (r, f) in read_table::<GenerationRow>(file).unwrap().iter().zip(&full) {
                assert_eq!(r, f, "{dtype}: batch {b} vs 16");
            }
            let hash = |p: &Path| blake3::hash(&std::fs::read(p).unwrap());
            assert_eq!(
                hash(file),
                hash(&files[2]),
                "{dtype}: batch {b} vs 16: same rows, different bytes"
            );
        }
    }

    let full = read_table::<GenerationRow>(&dir.path().join("f32-b16.parquet")).unwrap();
    assert_eq!(full.len(), 15);
    let mut union = Vec::new();
    for i in 0..3 {
        let path = run(
            &format!("shard{i}.parquet"),
            SampleOptions {
                shard: Some((i, 3)),
                ..options()
            },
        );
        union.extend(read_table::<GenerationRow>(&path).unwrap());
    }
    assert_eq!(union, full);
}

#[test]
fn empty_prompt_file_gives_an_empty_table() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("empty.txt");
    std::fs::write(&prompts, "").unwrap();
    let out = sample_file(&tiny(), &prompts, &options(), Device::Cpu, dir.path()).unwrap();
    assert!(read_table::<GenerationRow>(&out).unwrap().is_empty());
}

#[test]
fn every_listed_eos_id_ends_a_completion_and_is_masked_before_the_minimum() {
    // A copy of the tiny model whose generation_config lists a second EOS id: the
    // token greedy decoding picks first.
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(tiny()).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    let model = Model::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    let greedy = SampleOptions {
        greedy: true,
        samples_per_prompt: 1,
        min_new_tokens: 0,
        ..options()
    };
    let first = generate(&model, &prompts()[..1], &greedy, "m").unwrap()[0].completion_tokens[0];
    let listed = serde_json::json!({ "eos_token_id": [model.eos_token_id().unwrap(), first] });
    std::fs::write(
        dir.path().join("generation_config.json"),
        listed.to_string(),
    )
    .unwrap();
    let model = Model::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    assert!(model.eos_token_ids().contains(&(first as i64)));
    let row = &generate(&model, &prompts()[..1], &greedy, "m").unwrap()[0];
    assert_eq!(row.completion_tokens, vec![first]);
    assert_eq!(row.finish_reason, "eos");
    let at_least_one = SampleOptions {
        min_new_tokens: 1,
        ..greedy
    };
    let row = &generate(&model, &prompts()[..1], &at_least_one, "m").unwrap()[0];
    assert_ne!(
        row.completion_tokens[0], first,
        "masked before --min-new-tokens"
    );
}

/// Regression (bad input 5 and 6): NaN and infinity were both written as `null` in the
/// stage key, so `--temperature NaN` and `--temperature inf` shared one output. The
/// library refuses them (and the other meaningless settings) before any key.
#[test]
fn non_finite_and_out_of_range_options_are_refused_before_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "Hello\n").unwrap();
    let model = testing::tiny_models().join("gpt2");
    let bad = [
        SampleOptions {
            temperature: f64::NAN,
            ..options()
        },
        SampleOptions {
            temperature: f64::INFINITY,
            ..options()
        },
        SampleOptions {
            temperature: -1.0,
            ..options()
        },
        SampleOptions {
            top_p: f64::NAN,
            ..options()
        },
        SampleOptions {
            top_p: 2.0,
            ..options()
        },
        SampleOptions {
            batch_size: 0,
            ..options()
        },
        SampleOptions {
            max_prompt_tokens: 0,
            ..options()
        },
    ];
    for opts in bad {
        let err = sample_file(&model, &prompts, &opts, Device::Cpu, dir.path()).unwrap_err();
        let err = format!("{err:#}");
        assert!(err.starts_with("--"), "names the option: {err}");
    }
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "nothing written"
    );
}
