//! The Quark objective and the trainer: each loss term against a plain-formula
//! computation, control-token columns excluded, the schedule, N+N steps equal 2N,
//! checkpoints that load in transformers, bf16 mixed precision, and an end-to-end
//! run in which conditioning on the best quantile raises a synthetic reward. On the
//! CPU, or on the device `QUARK_TEST_DEVICE` names (`cuda`, for a check on a GPU).

use std::path::{Path, PathBuf};

use quark::fit::{
    fit, learning_rate, quark_loss, quark_loss_chunked, Adam, Backprop, FitOptions, LossRun,
    LossWeights, TrainRow,
};
use quark::model::Model;
use quark::pool::{bin, BinOptions};
use quark::sample::{sample_file, SampleOptions};
use quark::schema::{read_table, write_table, GenerationRow, ScoredRow};
use quark::testing;
use tch::{Device, Kind, Tensor};

fn tiny(name: &str) -> PathBuf {
    testing::tiny_models().join(name)
}

#[test]
fn the_constant_schedule_warms_up_then_holds_the_peak() {
    use quark::fit::Schedule;
    let c = Schedule::Constant;
    assert_eq!(c.rate(1e-3, 0, 10, 110), 0.0);
    assert!((c.rate(1e-3, 5, 10, 110) - 5e-4).abs() < 1e-15);
    for step in [10, 60, 110, 5000] {
        assert_eq!(c.rate(1e-3, step, 10, 110), 1e-3, "step {step}");
    }
    // The linear one is `learning_rate`, step for step.
    for step in [0, 5, 10, 60, 110, 500] {
        assert_eq!(
            Schedule::Linear.rate(1e-3, step, 10, 110),
            learning_rate(1e-3, step, 10, 110)
        );
    }
    assert_eq!("constant".parse::<Schedule>().unwrap(), c);
    assert!("cosine".parse::<Schedule>().is_err());
}

#[test]
fn schedule_warms_up_then_decays_linearly_to_zero() {
    assert_eq!(learning_rate(1e-3, 0, 10, 110), 0.0);
    assert!((learning_rate(1e-3, 5, 10, 110) - 5e-4).abs() < 1e-15);
    assert!((learning_rate(1e-3, 10, 10, 110) - 1e-3).abs() < 1e-15);
    assert!((learning_rate(1e-3, 60, 10, 110) - 5e-4).abs() < 1e-15);
    assert_eq!(learning_rate(1e-3, 110, 10, 110), 0.0);
    assert_eq!(learning_rate(1e-3, 500, 10, 110), 0.0);
    assert!((learning_rate(1e-3, 0, 0, 10) - 1e-3).abs() < 1e-15);
}

fn rows() -> Vec<TrainRow> {
    vec![
        TrainRow {
            quantile: 0,
            prompt: vec![5, 6, 7],
            completion: vec![8, 9, 10, 11],
        },
        TrainRow {
            quantile: 2,
            prompt: vec![12],
            completion: vec![13, 14],
        },
        TrainRow {
            quantile: 4,
            prompt: vec![15, 16, 17, 18, 19],
            completion: vec![20],
        },
    ]
}

fn logits_of(model: &Model, seq: &[i64]) -> Vec<Vec<f64>> {
    let ids = Tensor::from_slice(seq).view([1, -1]).to(model.device());
    let l = tch::no_grad(|| model.forward(&ids, &ids.ones_like())).unwrap();
    let l = l.squeeze_dim(0).to_kind(Kind::Double).to(Device::Cpu);
    (0..seq.len() as i64)
        .map(|i| Vec::<f64>::try_from(l.get(i)).unwrap())
        .collect()
}

fn log_softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z = x.iter().map(|v| (v - m).exp()).sum::<f64>().ln() + m;
    x.iter().map(|v| v - z).collect()
}

/// A row's tokens as the reference sees them, and behind its control token (the
/// first control token's id is `first_control`) as the policy does.
fn sequences(first_control: i64, r: &TrainRow) -> (Vec<i64>, Vec<i64>) {
    let seq: Vec<i64> = r
        .prompt
        .iter()
        .chain(&r.completion)
        .map(|&t| t as i64)
        .collect();
    let mut pol_seq = vec![first_control + r.quantile as i64];
    pol_seq.extend(&seq);
    (seq, pol_seq)
}

/// (nll, kl, entropy, unlikelihood) sums over completion tokens, computed row by row
/// without padding, in f64, from the plain formulas.
fn plain_terms(policy: &Model, reference: &Model, rows: &[TrainRow]) -> [f64; 4] {
    let c = policy.control_tokens().unwrap();
    let kept = kept_ids(policy, reference);
    let col = |t: i64| kept.binary_search(&t).expect("not a control token");
    let pick = |row: &[f64]| -> Vec<f64> { kept.iter().map(|&i| row[i as usize]).collect() };
    let mut out = [0.0; 4];
    for r in rows {
        let (seq, pol_seq) = sequences(c.first_id, r);
        let pol = logits_of(policy, &pol_seq);
        let refl = logits_of(reference, &seq);
        for (j, &y) in r.completion.iter().enumerate() {
            let pos = r.prompt.len() + j - 1; // position in `seq` that predicts y
            let lp = log_softmax(&pick(&pol[pos + 1]));
            let lq = log_softmax(&pick(&refl[pos]));
            out[0] -= lp[col(y as i64)];
            for v in 0..kept.len() {
                let p = lp[v].exp();
                out[1] += p * (lp[v] - lq[v]);
                out[2] -= p * lp[v];
            }
            // Unlikelihood candidates: earlier tokens (up to pos) other than y.
            let mut cands: Vec<i64> = seq[..=pos].to_vec();
            cands.sort();
            cands.dedup();
            for cand in cands.into_iter().filter(|&t| t != y as i64) {
                out[3] -= (1.0 - lp[col(cand)].exp()).max(1e-5).ln();
            }
        }
    }
    out
}

/// The ids whose columns the loss keeps: the reference's vocabulary without the
/// policy's control tokens (which sit past it, or inside it on spare rows).
fn kept_ids(policy: &Model, reference: &Model) -> Vec<i64> {
    let c = policy.control_tokens().unwrap();
    (0..reference.vocab_size())
        .filter(|id| !c.ids().contains(id))
        .collect()
}

const WEIGHTS: LossWeights = LossWeights {
    kl: 0.05,
    entropy: 0.06,
    unlikelihood: 0.5,
};

/// The same loss as one autograd graph built row by row without padding, chunks or
/// cuts: its gradient is the reference for the trainer's.
fn plain_loss(policy: &Model, reference: &Model, rows: &[TrainRow], w: LossWeights) -> Tensor {
    let c = policy.control_tokens().unwrap();
    let kept = kept_ids(policy, reference);
    let col = |t: i64| kept.binary_search(&t).expect("not a control token") as i64;
    let dev = policy.device();
    let columns = Tensor::from_slice(&kept).to(dev);
    let mut total = Tensor::zeros([], (Kind::Float, dev));
    for r in rows {
        let (seq, pol_seq) = sequences(c.first_id, r);
        let ids = Tensor::from_slice(&pol_seq).view([1, -1]).to(dev);
        let pol = policy.forward(&ids, &ids.ones_like()).unwrap().get(0);
        let ids = Tensor::from_slice(&seq).view([1, -1]).to(dev);
        let refl = tch::no_grad(|| reference.forward(&ids, &ids.ones_like()).unwrap()).get(0);
        for (j, &y) in r.completion.iter().enumerate() {
            let pos = (r.prompt.len() + j - 1) as i64;
            let lp = pol
                .get(pos + 1)
                .index_select(0, &columns)
                .log_softmax(-1, Kind::Float);
            let lq = refl
                .get(pos)
                .index_select(0, &columns)
                .log_softmax(-1, Kind::Float);
            let p = lp.exp();
            let nll = -lp.get(col(y as i64));
            let kl = (&p * (&lp - &lq)).sum(Kind::Float);
            let ent = -(&p * &lp).sum(Kind::Float);
            let mut cands: Vec<i64> = seq[..=pos as usize].to_vec();
            cands.sort();
            cands.dedup();
            cands.retain(|&t| t != y as i64);
            let cands: Vec<i64> = cands.into_iter().map(col).collect();
            let pc = p.index_select(0, &Tensor::from_slice(&cands).to(dev));
            let ul = -(-pc + 1.0).clamp_min(1e-5).log().sum(Kind::Float);
            total = total + nll + kl * w.kl - ent * w.entropy + ul * w.unlikelihood;
        }
    }
    total
}

/// The policy's gradients by name, cleared afterwards.
fn take_grads(policy: &Model) -> Vec<(String, Tensor)> {
    let mut vars: Vec<(String, Tensor)> = policy.var_store().variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars.into_iter()
        .map(|(n, mut v)| {
            let g = v.grad().copy();
            v.zero_grad();
            (n, g)
        })
        .collect()
}

#[test]
fn the_gradient_matches_plain_autograd_in_chunks_and_with_checkpointing() {
    for name in ["llama-tied", "llama-untied", "gpt2", "spare-rows"] {
        let policy = with_controls(name);
        let reference = reference_of(name);
        let rows = rows_for(&policy, &reference);
        // The same policy with no gradient defined yet: the head's is made first.
        let fresh = with_controls(name);
        let backprop = Backprop {
            scale: 0.5,
            checkpoint: false,
        };
        quark_loss(&fresh, &reference, &rows, WEIGHTS, Some(backprop)).unwrap();
        let plain = plain_loss(&policy, &reference, &rows, WEIGHTS);
        let plain_value = plain.double_value(&[]);
        plain.backward();
        let want = take_grads(&policy);
        let check_of = |model: &Model, what: &str| {
            for ((var, g), (_, w)) in take_grads(model).iter().zip(&want) {
                let scale = w.abs().max().double_value(&[]);
                let diff = (g * 2.0 - w).abs().max().double_value(&[]);
                assert!(
                    diff <= 1e-4 * scale.max(1e-6),
                    "{name} {var}, {what}: gradient off by {diff} (scale {scale})"
                );
            }
        };
        check_of(&fresh, "no gradient defined before");
        let check = |what: &str| check_of(&policy, what);
        let tokens: usize = rows.iter().map(|r| r.completion.len()).sum();
        // The one-pass kernel where it applies (not on spare rows) and libtorch's
        // operations, in one chunk, a token a chunk (one lane of the kernel's
        // blocks) and three.
        let runs = [(tokens, false), (1, false), (3, true)];
        for ((per_chunk, checkpoint), one_pass) in
            runs.into_iter().flat_map(|r| [(r, true), (r, false)])
        {
            let backprop = Backprop {
                scale: 0.5,
                checkpoint,
            };
            let run = LossRun {
                tokens_per_chunk: per_chunk,
                one_pass,
            };
            let t = quark_loss_chunked(&policy, &reference, &rows, WEIGHTS, Some(backprop), run)
                .unwrap();
            assert!(
                (t.loss - plain_value).abs() < 1e-4 * plain_value.abs(),
                "{name}: loss {} vs {plain_value}",
                t.loss
            );
            assert_eq!(t.tokens, tokens as i64);
            let applies = name != "spare-rows" && testing::device() == Device::Cpu;
            assert_eq!(t.one_pass, one_pass && applies, "{name}: the path taken");
            check(&format!(
                "{per_chunk} tokens a chunk, checkpointing {checkpoint}, one pass {one_pass}"
            ));
        }
        // Two micro-batches add up to the whole batch's gradient.
        let backprop = Some(Backprop {
            scale: 0.5,
            checkpoint: true,
        });
        for part in [&rows[..1], &rows[1..]] {
            quark_loss(&policy, &reference, part, WEIGHTS, backprop).unwrap();
        }
        check("two micro-batches");
    }
}

/// In bf16, the one-pass kernel's terms and gradients are libtorch's to bf16's
/// precision (the products' roundings differ: the kernel's logits are `W xᵀ`).
#[test]
fn the_one_pass_loss_matches_libtorch_operations_in_bf16() {
    let load = |controls: bool| {
        let mut m = Model::load(&tiny("llama-tied"), testing::device(), Kind::BFloat16).unwrap();
        if controls {
            m.add_control_tokens(5, 3).unwrap();
        }
        m
    };
    let reference = load(false);
    let rows = rows();
    let backprop = Backprop {
        scale: 0.5,
        checkpoint: false,
    };
    let [(a, grads_a), (b, grads_b)] = [true, false].map(|one_pass| {
        let policy = load(true);
        let run = LossRun {
            tokens_per_chunk: 4,
            one_pass,
        };
        let t =
            quark_loss_chunked(&policy, &reference, &rows, WEIGHTS, Some(backprop), run).unwrap();
        (t, take_grads(&policy))
    });
    assert_eq!(
        (a.one_pass, b.one_pass),
        (testing::device() == Device::Cpu, false),
        "the paths taken"
    );
    for (x, y, what) in [
        (a.loss, b.loss, "loss"),
        (a.nll, b.nll, "nll"),
        (a.kl, b.kl, "kl"),
        (a.entropy, b.entropy, "entropy"),
        (a.unlikelihood, b.unlikelihood, "unlikelihood"),
    ] {
        assert!(
            (x - y).abs() <= 1e-2 * y.abs().max(1.0),
            "{what}: {x} vs {y}"
        );
    }
    for ((var, g), (_, w)) in grads_a.iter().zip(&grads_b) {
        let (g, w) = (g.to_kind(Kind::Float), w.to_kind(Kind::Float));
        let scale = w.abs().max().double_value(&[]);
        let diff = (&g - &w).abs().max().double_value(&[]);
        assert!(scale > 0.0, "{var}: no gradient");
        assert!(
            diff <= 3e-2 * scale,
            "{var}: gradient off by {diff} (scale {scale})"
        );
    }
}

/// A tiny model's folder; "spare-rows" is the tied Llama with 8 embedding rows past
/// its tokenizer's ids.
fn model_dir(name: &str) -> PathBuf {
    if name == "spare-rows" {
        testing::spare_rows_model().to_owned()
    } else {
        tiny(name)
    }
}

fn with_controls(name: &str) -> Model {
    let mut m = Model::load(&model_dir(name), testing::device(), Kind::Float).unwrap();
    m.add_control_tokens(5, 3).unwrap();
    m
}

fn reference_of(name: &str) -> Model {
    Model::load(&model_dir(name), testing::device(), Kind::Float).unwrap()
}

/// The hand-made rows, and for a model whose control tokens took spare rows a row
/// with the spare ids above them (a sampler may draw those).
fn rows_for(policy: &Model, reference: &Model) -> Vec<TrainRow> {
    let mut rows = rows();
    let c = policy.control_tokens().unwrap();
    let above = c.ids().end;
    if above < reference.vocab_size() {
        rows.push(TrainRow {
            quantile: 1,
            prompt: vec![5, above as u32 + 2],
            completion: vec![above as u32 + 1, 9, above as u32 + 2],
        });
    }
    rows
}

#[test]
fn each_loss_term_matches_the_plain_formula() {
    // "spare-rows": the control tokens take spare embedding rows inside the
    // vocabulary, and a row uses the spare ids above them.
    for name in ["llama-tied", "spare-rows"] {
        let policy = with_controls(name);
        let reference = reference_of(name);
        let rows = rows_for(&policy, &reference);
        let t = quark_loss(&policy, &reference, &rows, WEIGHTS, None).unwrap();
        let [nll, kl, ent, ul] = plain_terms(&policy, &reference, &rows);
        assert_eq!(
            t.tokens,
            rows.iter().map(|r| r.completion.len() as i64).sum::<i64>()
        );
        for (got, want, what) in [
            (t.nll, nll, "nll"),
            (t.kl, kl, "kl"),
            (t.entropy, ent, "entropy"),
            (t.unlikelihood, ul, "unlikelihood"),
        ] {
            assert!(
                (got - want).abs() < 1e-4 * want.abs().max(1.0),
                "{name} {what}: {got} vs {want}"
            );
        }
        let loss = t.loss;
        let want = nll + 0.05 * kl - 0.06 * ent + 0.5 * ul;
        assert!(
            (loss - want).abs() < 1e-4 * want.abs(),
            "{name}: loss {loss} vs {want}"
        );
        // KL is a divergence: positive here (the control token changes the input).
        assert!(kl > 0.0);
    }
}

#[test]
fn control_token_columns_are_excluded_from_every_term() {
    // Untied head: make the control tokens' output rows enormous. Were their
    // columns kept, they would take all the probability mass.
    let mut policy = with_controls("llama-untied");
    let reference = Model::load(&tiny("llama-untied"), testing::device(), Kind::Float).unwrap();
    let before = quark_loss(&policy, &reference, &rows(), WEIGHTS, None).unwrap();
    let c = policy.control_tokens().unwrap();
    tch::no_grad(|| {
        let vars = policy.var_store_mut().variables();
        let head = &vars["lm_head.weight"];
        let _ = head.narrow(0, c.first_id, c.k as i64).fill_(50.0);
    });
    let after = quark_loss(&policy, &reference, &rows(), WEIGHTS, None).unwrap();
    assert_eq!(before.nll, after.nll);
    assert_eq!(before.kl, after.kl);
    assert_eq!(before.entropy, after.entropy);
}

#[test]
fn the_control_rows_learn_at_the_scaled_rate_and_nothing_else_changes() {
    // One Adam step on the same loss with and without the scale: the control rows'
    // updates are 100 times larger, every other element's the same.
    let step = |scale: Option<f64>| -> (Tensor, Tensor) {
        let policy = with_controls("llama-tied");
        let reference = reference_of("llama-tied");
        let mut adam = Adam::new(&policy, (0.9, 0.999), 1e-5, None, false).unwrap();
        if let Some(s) = scale {
            adam.scale_control_rows(&policy, s).unwrap();
        }
        let emb = policy.var_store().variables()["model.embed_tokens.weight"].shallow_clone();
        let before = emb.detach().copy();
        let backprop = Backprop {
            scale: 1.0,
            checkpoint: false,
        };
        quark_loss(&policy, &reference, &rows(), WEIGHTS, Some(backprop)).unwrap();
        adam.step(1e-4, 1, 1.0);
        let norm = policy.var_store().variables()["model.norm.weight"]
            .detach()
            .copy();
        (emb.detach() - before, norm)
    };
    let (plain, norm_plain) = step(None);
    let (scaled, norm_scaled) = step(Some(100.0));
    let c = with_controls("llama-tied").control_tokens().unwrap();
    let rows_of = |t: &Tensor, a: i64, n: i64| t.narrow(0, a, n);
    let k = i64::from(c.k);
    let control = rows_of(&plain, c.first_id, k);
    assert!(
        control.abs().max().double_value(&[]) > 0.0,
        "the control rows got no update"
    );
    let ratio = (rows_of(&scaled, c.first_id, k) - &control * 100.0)
        .abs()
        .max()
        .double_value(&[]);
    // (f32: the difference of two weights carries their rounding.)
    assert!(ratio < 1e-6, "control rows: {ratio} off 100x");
    assert!(rows_of(&scaled, 0, c.first_id).equal(&rows_of(&plain, 0, c.first_id)));
    assert!(norm_scaled.equal(&norm_plain));
}

#[test]
fn bf16_gradients_of_micro_batches_add_up_in_f32() {
    // 1 + 2^-9 is not a bf16 number (the nearest is 1): summed in the parameter's
    // bf16 gradient the second micro-batch would vanish; absorbed, it does not.
    let mut model = Model::load(&tiny("llama-tied"), testing::device(), Kind::Float).unwrap();
    let mut adam = Adam::new(&model, (0.9, 0.999), 1e-5, None, true).unwrap();
    model.var_store_mut().set_kind(Kind::BFloat16);
    let w = model.var_store().variables()["model.norm.weight"].shallow_clone();
    let n = w.numel() as f64;
    for g in [1.0, 2f64.powi(-9)] {
        (&w * g).sum(Kind::Float).backward();
        adam.absorb();
    }
    let want = n.sqrt() * (1.0 + 2f64.powi(-9));
    let got = adam.grad_norm();
    assert!((got - want).abs() < 1e-9 * want, "norm {got} vs {want}");
    // The same two gradients summed in the parameter's bf16 gradient: the second
    // vanishes.
    for g in [1.0, 2f64.powi(-9)] {
        (&w * g).sum(Kind::Float).backward();
    }
    assert_eq!(w.grad().double_value(&[0]), 1.0);
}

/// Adam, in one pass over the elements and in libtorch operations, against
/// torch.optim.Adam: three steps of a tiny model with given gradients (doubled each
/// step, halved by clipping on the second), in f32 and with bf16 parameters over
/// f32 master weights. The gradients are bf16 numbers, so both runs see the same.
#[test]
fn adam_matches_torch_optim_adam() {
    let dir = tempfile::tempdir().unwrap();
    let (lr, betas, eps) = (1e-2, (0.9, 0.999), 1e-5);
    let clip = [1.0, 0.5, 1.0];
    let start = Model::load(&tiny("llama-tied"), Device::Cpu, Kind::Float).unwrap();
    tch::manual_seed(7);
    let named = |suffix: &str| -> Vec<(String, Tensor)> {
        start
            .var_store()
            .variables()
            .into_iter()
            .map(|(n, v)| (format!("{n}{suffix}"), v))
            .collect()
    };
    let params = named("");
    let grads: Vec<(String, Tensor)> = named("")
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                v.randn_like().to_kind(Kind::BFloat16).to_kind(Kind::Float),
            )
        })
        .collect();
    Tensor::write_safetensors(&params, dir.path().join("params.safetensors")).unwrap();
    Tensor::write_safetensors(&grads, dir.path().join("grads.safetensors")).unwrap();
    testing::run_python(
        r#"
import sys, torch
from safetensors.torch import load_file, save_file
d, lr, b1, b2, eps = sys.argv[1], *map(float, sys.argv[2:6])
clip = [float(c) for c in sys.argv[6].split(",")]
params = {n: torch.nn.Parameter(t) for n, t in load_file(d + "/params.safetensors").items()}
grads = load_file(d + "/grads.safetensors")
opt = torch.optim.Adam(params.values(), lr=lr, betas=(b1, b2), eps=eps, foreach=False)
for step, c in enumerate(clip):
    for n, p in params.items():
        p.grad = grads[n] * 2**step * c
    opt.step()
save_file({n: p.detach() for n, p in params.items()}, d + "/torch.safetensors")
"#,
        &[
            dir.path().as_os_str(),
            lr.to_string().as_ref(),
            betas.0.to_string().as_ref(),
            betas.1.to_string().as_ref(),
            eps.to_string().as_ref(),
            clip.map(|c| c.to_string()).join(",").as_ref(),
        ],
    );
    let want: std::collections::BTreeMap<String, Tensor> =
        Tensor::read_safetensors(dir.path().join("torch.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let grads: std::collections::BTreeMap<String, Tensor> = grads.into_iter().collect();
    for bf16 in [false, true] {
        for one_pass in [true, false] {
            let case = format!("bf16 {bf16}, one pass {one_pass}");
            let mut model =
                Model::load(&tiny("llama-tied"), testing::device(), Kind::Float).unwrap();
            let mut adam = Adam::new(&model, betas, eps, None, bf16).unwrap();
            adam.set_one_pass(one_pass);
            if bf16 {
                model.var_store_mut().set_kind(Kind::BFloat16);
            }
            let vars = model.var_store().variables();
            for (step, c) in clip.iter().enumerate() {
                for (n, v) in &vars {
                    let g = (&grads[n] * 2f64.powi(step as i32)).to(v.device());
                    (v * g.to_kind(v.kind())).sum(Kind::Float).backward();
                }
                adam.step(lr, step as u64 + 1, *c);
                // Set to none, as torch's zero_grad does: the next backward pass
                // keeps its gradients rather than adding them to zeros.
                for (n, v) in &vars {
                    assert!(!v.grad().defined(), "{case}: {n} keeps a gradient");
                }
            }
            let mut worst: f64 = 0.0;
            for (n, v) in &vars {
                let w = want[n].to(v.device());
                // A bf16 parameter is its master rounded: within half a bf16 step.
                let tolerance = if bf16 { 2f64.powi(-8) } else { 1e-6 };
                let diff = (v.to_kind(Kind::Float) - &w).abs().max().double_value(&[]);
                let scale = w.abs().max().double_value(&[]).max(1.0);
                assert!(diff <= tolerance * scale, "{case}: {n} differs by {diff}");
            }
            adam.restore_master(&mut model).unwrap();
            for (n, v) in model.var_store().variables() {
                let w = want[&n].to(v.device());
                let diff = (v.to_kind(Kind::Float) - &w).abs().max().double_value(&[]);
                worst = worst.max(diff);
            }
            // f32 rounding of a few operations on weights of size about 1.
            assert!(worst < 1e-6, "{case}: master weights differ by {worst}");
        }
    }
}

/// A pool made from hand-written rows with rewards, cut into 5 quantiles.
fn make_pool(dir: &Path) -> PathBuf {
    let rows: Vec<ScoredRow> = (0..12u32)
        .map(|i| {
            let mut g = testing::generation(&format!("p{i}"), 0, 0);
            g.prompt_tokens = vec![5 + i, 6, 7];
            g.completion_tokens = (0..(2 + i % 4)).map(|j| 20 + i + j).collect();
            ScoredRow {
                generation: g,
                reward: Some(i as f64 / 12.0),
                scores: vec![],
                quantile: None,
            }
        })
        .collect();
    let scored = dir.join("scored.parquet");
    write_table(
        &scored,
        rows,
        &[],
        &testing::meta("scored", serde_json::json!({})),
    )
    .unwrap();
    let opts = BinOptions {
        quantiles: 5,
        max_pool_rows: None,
        only_latest: false,
    };
    bin(&[scored], None, &opts, &dir.join("pool.parquet")).unwrap()
}

fn fit_options(steps: u64) -> FitOptions {
    FitOptions {
        steps,
        batch_size: 4,
        grad_accum: 2,
        lr: 1e-3,
        adam_eps: 1e-5,
        adam_betas: (0.9, 0.999),
        warmup_steps: 2,
        total_steps: 8,
        schedule: Default::default(),
        kl_coef: 0.05,
        entropy_coef: 0.06,
        adaptive_kl: Some((0.5, 100.0)),
        max_grad_norm: Some(1.0),
        unlikelihood_coef: 0.0,
        control_lr_scale: 1.0,
        control_init: Default::default(),
        seed: 11,
        iteration: 0,
        dtype: quark::device::DType::F32,
        gradient_checkpointing: false,
        progress: false,
    }
}

fn weights(dir: &Path) -> Vec<(String, Tensor)> {
    let mut w = Tensor::read_safetensors(dir.join("model.safetensors")).unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn max_weight_diff(a: &Path, b: &Path) -> f64 {
    weights(a)
        .iter()
        .zip(weights(b))
        .map(|((na, ta), (nb, tb))| {
            assert_eq!(na, &nb);
            (ta - tb).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max)
}

fn two_fits_equal_one(dtype: &str, tolerance: f64) {
    let dir = tempfile::tempdir().unwrap();
    let pool = make_pool(dir.path());
    let base = tiny("llama-tied");
    let opts = |steps, checkpointing| FitOptions {
        dtype: dtype.parse().unwrap(),
        gradient_checkpointing: checkpointing,
        ..fit_options(steps)
    };
    let run = |policy: &Path, steps: u64, out: &str, checkpointing: bool| {
        fit(
            &pool,
            policy,
            &base,
            &opts(steps, checkpointing),
            testing::device(),
            &dir.path().join(out),
        )
        .unwrap()
    };
    // The second half with gradient checkpointing, which must not change the result.
    let half = run(&base, 3, "a1", false);
    let two = run(&half, 3, "a2", true);
    let one = run(&base, 6, "b", false);
    let diff = max_weight_diff(&two, &one);
    assert!(
        diff < tolerance,
        "{dtype}: 3+3 steps vs 6 steps differ by {diff}"
    );
    // Training moved the weights at all.
    assert!(max_weight_diff(&one, &half) > 1e-4);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(two.join("trainer_state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 6);
    let metrics = read_table::<quark::schema::FitMetricsRow>(&two.join("metrics.parquet")).unwrap();
    assert_eq!(
        metrics.iter().map(|m| m.step).collect::<Vec<_>>(),
        vec![4, 5, 6]
    );
    // Same inputs again: the stage finds its output.
    let again = fit(
        &pool,
        &half,
        &base,
        &opts(3, false),
        testing::device(),
        &dir.path().join("a2"),
    )
    .unwrap();
    assert_eq!(again, two);
}

#[test]
fn three_plus_three_steps_equal_six_in_f32() {
    two_fits_equal_one("f32", 1e-5);
}

#[test]
fn three_plus_three_steps_equal_six_in_bf16() {
    // The bf16 path keeps f32 master weights and Adam state, and only the forward and
    // backward run in bf16, so a continued fit reproduces the same master weights
    // exactly as f32 does; the tolerance is still the same.
    two_fits_equal_one("bf16", 1e-5);
}

#[test]
fn the_checkpoint_loads_in_transformers_with_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let pool = make_pool(dir.path());
    let base = tiny("gpt2");
    let ckpt = fit(
        &pool,
        &base,
        &base,
        &fit_options(2),
        testing::device(),
        &dir.path().join("ckpt"),
    )
    .unwrap();
    let model = Model::load(&ckpt, testing::device(), Kind::Float).unwrap();
    let c = model.control_tokens().unwrap();
    let seq: Vec<i64> = vec![c.first_id, 5, 6, 7, 8, 9];
    let rust = logits_of(&model, &seq);
    let script = r#"
import json, sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
ids = torch.tensor([json.loads(sys.argv[2])])
with torch.no_grad():
    print(json.dumps(m(ids).logits[0].double().tolist()))
"#;
    let out = testing::run_python(
        script,
        &[
            ckpt.as_os_str(),
            std::ffi::OsStr::new(&serde_json::to_string(&seq).unwrap()),
        ],
    );
    let py: Vec<Vec<f64>> = serde_json::from_str(&out).unwrap();
    assert_eq!(py[0].len(), rust[0].len(), "vocabulary with control tokens");
    let diff = rust
        .iter()
        .flatten()
        .zip(py.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(diff < 1e-4, "logits differ by {diff}");
}

/// Reward: the share of one chosen token in the completion.
fn score_share(generations: &Path, token: u32, out: &Path) -> PathBuf {
    let rows: Vec<ScoredRow> = read_table::<GenerationRow>(generations)
        .unwrap()
        .into_iter()
        .map(|g| {
            let n = g.completion_tokens.len().max(1) as f64;
            let share = g.completion_tokens.iter().filter(|&&t| t == token).count() as f64 / n;
            ScoredRow {
                generation: g,
                reward: Some(share),
                scores: vec![Some(share)],
                quantile: None,
            }
        })
        .collect();
    write_table(
        out,
        rows,
        &["share".into()],
        &testing::meta("scored", serde_json::json!({})),
    )
    .unwrap();
    out.to_owned()
}

fn mean_share(generations: &Path, token: u32) -> f64 {
    let rows = read_table::<GenerationRow>(generations).unwrap();
    let n: usize = rows.iter().map(|r| r.completion_tokens.len()).sum();
    rows.iter()
        .flat_map(|r| &r.completion_tokens)
        .filter(|&&t| t == token)
        .count() as f64
        / n as f64
}

#[test]
fn conditioning_on_the_best_quantile_raises_a_synthetic_reward() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = tiny("llama-tied");
    let prompts = d.join("prompts.txt");
    let texts: Vec<String> = (0..24)
        .map(|i| format!("Language model number {i} says"))
        .collect();
    std::fs::write(&prompts, texts.join("\n")).unwrap();
    // The token to reward: a frequent one in the reference's samples.
    let sample = |model: &Path, condition: Option<u32>, it: u32, name: &str| {
        let opts = SampleOptions {
            condition,
            samples_per_prompt: 4,
            max_new_tokens: 8,
            min_new_tokens: 8,
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            greedy: false,
            seed: 100 + it as u64,
            max_prompt_tokens: 64,
            shard: None,
            limit: None,
            iteration: it,
            dtype: quark::device::DType::F32,
            batch_size: 32,
            progress: false,
        };
        sample_file(model, &prompts, &opts, testing::device(), &d.join(name)).unwrap()
    };
    let first = sample(&base, None, 0, "g0.parquet");
    let rows = read_table::<GenerationRow>(&first).unwrap();
    let mut counts = std::collections::HashMap::new();
    rows.iter()
        .flat_map(|r| &r.completion_tokens)
        .for_each(|&t| *counts.entry(t).or_insert(0) += 1);
    let token = *counts
        .iter()
        .max_by_key(|(t, c)| (**c, std::cmp::Reverse(**t)))
        .unwrap()
        .0;

    let mut policy = base.clone();
    let mut pool: Option<PathBuf> = None;
    let mut generations = first;
    for it in 0..3u32 {
        let scored = score_share(&generations, token, &d.join(format!("s{it}.parquet")));
        let opts = BinOptions {
            quantiles: 5,
            max_pool_rows: None,
            only_latest: false,
        };
        let p = bin(
            &[scored],
            pool.as_deref(),
            &opts,
            &d.join(format!("pool{it}.parquet")),
        )
        .unwrap();
        let fo = FitOptions {
            steps: 15,
            batch_size: 16,
            grad_accum: 1,
            lr: 3e-3,
            warmup_steps: 0,
            total_steps: 45,
            schedule: Default::default(),
            adaptive_kl: None,
            iteration: it,
            // The tokens start alike (the vocabulary's mean): they learn faster than
            // the pretrained rest, as the task files set it.
            control_lr_scale: 100.0,
            ..fit_options(15)
        };
        policy = fit(
            &p,
            &policy,
            &base,
            &fo,
            testing::device(),
            &d.join(format!("policy{it}")),
        )
        .unwrap();
        pool = Some(p);
        generations = sample(&policy, Some(0), it + 1, &format!("g{}.parquet", it + 1));
    }
    let reference = mean_share(&sample(&base, None, 9, "ref.parquet"), token);
    let best = mean_share(&sample(&policy, Some(0), 9, "best.parquet"), token);
    let worst = mean_share(&sample(&policy, Some(4), 9, "worst.parquet"), token);
    eprintln!("share of token {token}: reference {reference:.3}, <|quark:0|> {best:.3}, <|quark:4|> {worst:.3}");
    assert!(best > reference, "best {best} vs reference {reference}");
    assert!(best > worst, "best {best} vs worst {worst}");
}

/// Regression (bad input 4): `--lr NaN` trained every weight to NaN and exited 0.
#[test]
fn non_finite_and_negative_hyper_parameters_are_refused_before_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let model = testing::tiny_models().join("gpt2");
    let bad = [
        FitOptions {
            lr: f64::NAN,
            ..fit_options(1)
        },
        FitOptions {
            lr: -1.0,
            ..fit_options(1)
        },
        FitOptions {
            lr: f64::INFINITY,
            ..fit_options(1)
        },
        FitOptions {
            kl_coef: f64::NAN,
            ..fit_options(1)
        },
        FitOptions {
            entropy_coef: -0.1,
            ..fit_options(1)
        },
        FitOptions {
            adam_eps: 0.0,
            ..fit_options(1)
        },
        FitOptions {
            max_grad_norm: Some(f64::NAN),
            ..fit_options(1)
        },
        FitOptions {
            adaptive_kl: Some((f64::INFINITY, 100.0)),
            ..fit_options(1)
        },
    ];
    for opts in bad {
        // The pool need not exist: the options are checked first.
        let err = fit(
            &dir.path().join("pool.parquet"),
            &model,
            &model,
            &opts,
            Device::Cpu,
            &dir.path().join("out"),
        )
        .unwrap_err();
        let err = format!("{err:#}");
        assert!(err.starts_with("--"), "names the option: {err}");
    }
}
