//! Sampling completions (Quark step 1, "explore"): batched generation with the
//! key/value cache, each prompt optionally conditioned on a reward-quantile token.
//!
//! Output is deterministic and independent of the batch size: every row draws its
//! randomness from its own stream, seeded by (seed, prompt_id, sample_index), and
//! every row computes the same numbers whatever batch it shares. For the latter, a
//! batch always has a multiple of [`ROW_MULTIPLE`] rows (libtorch's CPU matrix
//! products round a row differently when it falls in a partial block of rows; a
//! batch is filled up with copies of its last row, whose results are discarded), and
//! attention runs through [`crate::model::KvCache::batch_invariant`]: each row
//! attends to its own keys alone, so neither the other rows nor the padding that the
//! batch's longest prompt forces on it change its numbers. Prompts are sorted by
//! length, so batches are full and carry little padding.
//!
//! This module owns decoding and the generations file; the network itself is
//! [`crate::model`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::device::DType;
use crate::model::{rowwise, Model};
use crate::prompts::read_prompts;
use crate::schema::{finish, GenerationRow, PromptRow, TableWriter};
use crate::stage::{hash_path, Stage};

/// Forward passes run with a multiple of this many rows (see the module docs).
pub const ROW_MULTIPLE: usize = 8;

/// How completions are drawn. Everything here goes into the output's key except
/// `batch_size` and `device` placement, which do not change the output.
#[derive(Clone, Debug, Serialize)]
pub struct SampleOptions {
    /// Put `<|quark:K|>` in front of each prompt; None samples unconditioned.
    pub condition: Option<u32>,
    pub samples_per_prompt: u32,
    pub max_new_tokens: usize,
    /// EOS is masked until this many tokens are generated.
    pub min_new_tokens: usize,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: Option<usize>,
    pub greedy: bool,
    pub seed: u64,
    /// Longer prompts keep their last N tokens.
    pub max_prompt_tokens: usize,
    /// Only the I-th of N equal slices of the prompts: (I, N), I from 0.
    pub shard: Option<(usize, usize)>,
    /// Only the first N prompts.
    pub limit: Option<usize>,
    /// The Quark iteration recorded in each row.
    pub iteration: u32,
    /// The dtype the model computes in: it changes the numbers.
    pub dtype: DType,
    #[serde(skip)]
    pub batch_size: usize,
    #[serde(skip)]
    pub progress: bool,
}

impl SampleOptions {
    /// Checks the numbers the programs' flag parsers check (for library callers):
    /// a NaN or infinite option would also give the stage key a `null`.
    pub fn validate(&self) -> Result<()> {
        use crate::check::{check, POSITIVE, UNIT_FRACTION};
        check("--temperature", self.temperature, POSITIVE)?;
        check("--top-p", self.top_p, UNIT_FRACTION)?;
        for (name, n) in [
            ("--samples-per-prompt", self.samples_per_prompt as usize),
            ("--max-new-tokens", self.max_new_tokens),
            ("--max-prompt-tokens", self.max_prompt_tokens),
            ("--batch-size", self.batch_size),
        ] {
            if n == 0 {
                bail!("{name} must be at least 1");
            }
        }
        Ok(())
    }
}

/// A row's own random stream: the blake3 XOF of (seed, prompt_id, sample_index).
/// Counter-free and platform-independent, so a row draws the same numbers wherever
/// and with whatever batch it runs.
pub struct RowRng(blake3::OutputReader);

impl RowRng {
    pub fn new(seed: u64, prompt_id: &str, sample_index: u32) -> Self {
        let mut h = blake3::Hasher::new_derive_key("quark-rs sample 1");
        h.update(&seed.to_le_bytes());
        h.update(&sample_index.to_le_bytes());
        h.update(prompt_id.as_bytes());
        Self(h.finalize_xof())
    }

    /// A uniform draw in [0, 1) with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        let mut b = [0u8; 8];
        self.0.fill(&mut b);
        (u64::from_le_bytes(b) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// The distribution one token is drawn from: logits with masked ids removed, then
/// temperature, top-k and top-p (nucleus) applied as transformers applies them.
/// Returns (token id, probability) pairs of the support, most likely first.
pub fn sampling_distribution(
    logits: &[f32],
    masked: &[usize],
    temperature: f64,
    top_k: Option<usize>,
    top_p: f64,
) -> Vec<(usize, f64)> {
    let t = temperature.max(1e-6);
    let mut scaled: Vec<f64> = logits.iter().map(|&l| l as f64 / t).collect();
    for &m in masked {
        if m < scaled.len() {
            scaled[m] = f64::NEG_INFINITY;
        }
    }
    let max = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut probs: Vec<f64> = scaled.iter().map(|&s| (s - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);

    if top_k.is_none() && top_p >= 1.0 {
        // No truncation: the whole support, in id order (no sort needed to draw).
        return probs
            .into_iter()
            .enumerate()
            .filter(|(_, p)| *p > 0.0)
            .collect();
    }
    // Candidates: with top-p < 1 a token below (1 - p) / V can never be in the
    // nucleus (all such tokens together hold less than 1 - p), so only the rest
    // need sorting.
    let floor = if top_p < 1.0 && top_k.is_none() {
        (1.0 - top_p) / probs.len() as f64
    } else {
        0.0
    };
    let mut cand: Vec<(usize, f64)> = probs
        .iter()
        .enumerate()
        .filter(|(_, &p)| p > 0.0 && p >= floor)
        .map(|(i, &p)| (i, p))
        .collect();
    // Most likely first; equal probabilities by token id, for determinism.
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if let Some(k) = top_k.filter(|&k| k > 0) {
        cand.truncate(k);
    }
    if top_p < 1.0 {
        // Keep the smallest prefix whose mass reaches top_p (at least one token). The
        // mass is of the whole distribution, or of the top-k survivors when top-k
        // came first (transformers applies TopK, then TopP on what is left).
        let mass: f64 = if top_k.is_some() {
            cand.iter().map(|c| c.1).sum()
        } else {
            1.0
        };
        let mut acc = 0.0;
        let mut keep = 0;
        for c in &cand {
            keep += 1;
            acc += c.1 / mass;
            if acc >= top_p {
                break;
            }
        }
        cand.truncate(keep.max(1));
    }
    let kept: f64 = cand.iter().map(|c| c.1).sum();
    cand.iter_mut().for_each(|c| c.1 /= kept);
    cand
}

/// Draws from a distribution of [`sampling_distribution`] by inverse CDF.
pub fn draw(dist: &[(usize, f64)], u: f64) -> (usize, f64) {
    let mut acc = 0.0;
    for &(id, p) in dist {
        acc += p;
        if u < acc {
            return (id, p);
        }
    }
    *dist.last().expect("a distribution has support")
}

/// One row being generated.
struct Row {
    /// Index into the output order.
    out: usize,
    rng: RowRng,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    finished: Option<&'static str>,
}

/// A prompt ready for the model: its row, its tokens (without the control token).
struct Job {
    prompt: PromptRow,
    tokens: Vec<u32>,
}

/// The stage (and so the output's key) of sampling `prompts` from `model_dir` with
/// `opts`, once the options are checked.
pub fn stage(model_dir: &Path, prompts: &Path, opts: &SampleOptions) -> Result<Stage> {
    opts.validate()?;
    let model_hash = hash_path(model_dir)?.to_hex().to_string();
    let prompts_hash = hash_path(prompts)?.to_hex().to_string();
    Stage::from_hashes("generations", opts, vec![model_hash, prompts_hash])
}

/// Samples completions for the prompts in `prompts` and writes the generations
/// table to `out` (a file, or a folder to name it by its key in). Returns the path;
/// does nothing when that output already exists.
pub fn sample_file(
    model_dir: &Path,
    prompts: &Path,
    opts: &SampleOptions,
    device: Device,
    out: &Path,
) -> Result<PathBuf> {
    let stage = stage(model_dir, prompts, opts)?;
    let model_hash = stage.meta().inputs[0].clone();
    let path = stage.resolve_out(out, ".parquet");
    if stage.is_done(&path) {
        return Ok(path);
    }
    // Fail on an unusable --out now, not after the sampling.
    crate::stage::prepare_parent(&path)?;
    let kind = Kind::from(opts.dtype);
    let model = Model::load(model_dir, device, kind)?;
    let rows = select_prompts(read_prompts(prompts)?, opts)?;
    let generations = generate(&model, &rows, opts, &model_hash[..16])
        .with_context(|| format!("{}: sampling failed", prompts.display()))?;
    let mut w = TableWriter::<GenerationRow>::create(&path, &[], stage.meta())?;
    w.write(generations)?;
    w.finish()
}

/// Applies --limit then --shard.
fn select_prompts(mut rows: Vec<PromptRow>, opts: &SampleOptions) -> Result<Vec<PromptRow>> {
    if let Some(n) = opts.limit {
        rows.truncate(n);
    }
    if let Some((i, n)) = opts.shard {
        if n == 0 || i >= n {
            bail!("--shard {i}/{n}: needs 0 <= I < N");
        }
        let len = rows.len();
        let (start, end) = (len * i / n, len * (i + 1) / n);
        rows = rows[start..end].to_vec();
    }
    Ok(rows)
}

/// Generates `opts.samples_per_prompt` completions for each prompt, in prompt order
/// then sample order.
pub fn generate(
    model: &Model,
    prompts: &[PromptRow],
    opts: &SampleOptions,
    model_hash: &str,
) -> Result<Vec<GenerationRow>> {
    let _guard = tch::no_grad_guard();
    let control = match opts.condition {
        Some(q) => {
            let c = model.control_tokens().context(
                "--condition needs a model with control tokens (a quark-fit checkpoint)",
            )?;
            if q >= c.k {
                bail!(
                    "--condition {q}: the model has control tokens 0..{}",
                    c.k - 1
                );
            }
            Some(c.first_id + q as i64)
        }
        None => None,
    };
    let jobs = tokenize(model, prompts, opts)?;
    check_positions(model, &jobs, opts, control.is_some())?;
    let eos = model.eos_token_ids();
    let never = never_sampled(model);

    // Every (prompt, sample) row, by prompt length (the control token adds one to all).
    let spp = opts.samples_per_prompt as usize;
    let mut order: Vec<(usize, usize)> = (0..jobs.len())
        .flat_map(|j| (0..spp).map(move |s| (j, s)))
        .collect();
    let len_of = |j: usize| jobs[j].tokens.len() + usize::from(control.is_some());
    order.sort_by_key(|&(j, s)| (len_of(j), j, s));

    let progress = crate::progress::bar(opts.progress, (jobs.len() * spp) as u64, "sample", "rows");
    let started = Instant::now();
    let mut generated_tokens = 0usize;
    let mut results: Vec<Option<Row>> = (0..order.len()).map(|_| None).collect();
    let batch = opts.batch_size.max(1);
    let mut start = 0;
    while start < order.len() {
        let end = (start + batch).min(order.len());
        let width = order[start..end]
            .iter()
            .map(|&(j, _)| len_of(j))
            .max()
            .unwrap_or(0);
        let mut rows: Vec<Row> = order[start..end]
            .iter()
            .map(|&(j, s)| Row {
                out: j * spp + s,
                rng: RowRng::new(opts.seed, &jobs[j].prompt.prompt_id, s as u32),
                tokens: Vec::new(),
                logprobs: Vec::new(),
                finished: None,
            })
            .collect();
        let inputs: Vec<Vec<i64>> = order[start..end]
            .iter()
            .map(|&(j, _)| {
                control
                    .into_iter()
                    .chain(jobs[j].tokens.iter().map(|&t| t as i64))
                    .collect()
            })
            .collect();
        generate_batch(model, &inputs, width, &mut rows, opts, &eos, &never)?;
        for r in rows {
            generated_tokens += r.tokens.len();
            let i = r.out;
            results[i] = Some(r);
        }
        progress.inc((end - start) as u64);
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        progress.set_message(format!(
            "{:.1} prompts/s, {:.1} tokens/s",
            progress.position() as f64 / spp as f64 / secs,
            generated_tokens as f64 / secs
        ));
        start = end;
    }
    progress.finish_and_clear();
    eprintln!(
        "sample: {} rows, {generated_tokens} tokens in {:.1} s ({:.1} tokens/s, {})",
        order.len(),
        started.elapsed().as_secs_f64(),
        generated_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
        opts.dtype
    );

    let tokenizer = model.tokenizer();
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let r = r.expect("every row generated");
            let job = &jobs[i / spp];
            let completion = tokenizer
                .decode(&r.tokens, true)
                .map_err(|e| anyhow::anyhow!("cannot decode a completion: {e}"))?;
            Ok(GenerationRow {
                prompt_id: job.prompt.prompt_id.clone(),
                prompt: job.prompt.prompt.clone(),
                prompt_tokens: job.tokens.clone(),
                sample_index: (i % spp) as u32,
                completion,
                logprob: r.logprobs.iter().map(|&l| l as f64).sum(),
                completion_tokens: r.tokens,
                token_logprobs: r.logprobs,
                finish_reason: r.finished.unwrap_or(finish::LENGTH).to_owned(),
                condition: opts.condition,
                model: model_hash.to_owned(),
                iteration: opts.iteration,
                seed: opts.seed,
            })
        })
        .collect()
}

/// The ids never sampled: every control token, and the embedding's spare rows past
/// the tokenizer's ids (models padded to a round vocabulary have them): they are
/// not text, and a fit puts its control tokens there.
fn never_sampled(model: &Model) -> Vec<usize> {
    let token_ids = model
        .tokenizer()
        .get_vocab(true)
        .into_values()
        .max()
        .map_or(0, |m| i64::from(m) + 1);
    let control = model.control_tokens().map(|c| c.ids());
    let spare = token_ids..model.vocab_size();
    control
        .into_iter()
        .flatten()
        .chain(spare)
        .map(|id| id as usize)
        .collect()
}

/// Tokenizes each prompt, keeping the last `max_prompt_tokens` tokens of longer
/// ones (counted in a warning). An empty prompt starts from BOS (or EOS).
fn tokenize(model: &Model, prompts: &[PromptRow], opts: &SampleOptions) -> Result<Vec<Job>> {
    let start = model.bos_token_id().or(model.eos_token_id());
    let mut cut = 0;
    let jobs = prompts
        .iter()
        .map(|p| {
            let enc = model
                .tokenizer()
                .encode(p.prompt.as_str(), true)
                .map_err(|e| anyhow::anyhow!("prompt {}: cannot tokenize: {e}", p.prompt_id))?;
            let mut tokens = enc.get_ids().to_vec();
            if tokens.is_empty() {
                tokens.extend(start.map(|t| t as u32));
            }
            if tokens.is_empty() {
                bail!(
                    "prompt {} is empty and the model has no BOS or EOS token",
                    p.prompt_id
                );
            }
            if tokens.len() > opts.max_prompt_tokens {
                cut += 1;
                tokens.drain(..tokens.len() - opts.max_prompt_tokens);
            }
            Ok(Job {
                prompt: p.clone(),
                tokens,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    if cut > 0 {
        eprintln!(
            "warning: {cut} prompts were longer than {} tokens and keep only their last {}",
            opts.max_prompt_tokens, opts.max_prompt_tokens
        );
    }
    Ok(jobs)
}

/// Refuses prompts that, with the control token and `max_new_tokens`, need more
/// positions than the model has (before any memory is allocated for them).
fn check_positions(model: &Model, jobs: &[Job], opts: &SampleOptions, control: bool) -> Result<()> {
    let Some(limit) = model.position_limit() else {
        return Ok(());
    };
    let extra = usize::from(control) + opts.max_new_tokens;
    if let Some(job) = jobs.iter().find(|j| j.tokens.len() + extra > limit) {
        let lower = if extra < limit {
            format!(
                "lower --max-prompt-tokens to {} or --max-new-tokens",
                limit - extra
            )
        } else {
            format!(
                "lower --max-new-tokens below {}",
                limit - usize::from(control)
            )
        };
        bail!(
            "prompt {} has {} tokens: with {} new tokens{} that is more than the model's {limit} positions (config.json); {lower}",
            job.prompt.prompt_id,
            job.tokens.len(),
            opts.max_new_tokens,
            if control { " and the control token" } else { "" },
        );
    }
    Ok(())
}

/// Left-pads `inputs` to `width`, repeating the last row up to a multiple of
/// [`ROW_MULTIPLE`] rows.
/// Returns (ids, mask) as [rows, width] tensors.
fn padded_batch(inputs: &[Vec<i64>], width: usize, device: Device) -> (Tensor, Tensor) {
    let n = inputs.len().div_ceil(ROW_MULTIPLE) * ROW_MULTIPLE;
    let mut ids = vec![0i64; n * width];
    let mut mask = vec![0i64; n * width];
    for r in 0..n {
        let row = &inputs[r.min(inputs.len() - 1)];
        let pad = width - row.len();
        ids[r * width + pad..(r + 1) * width].copy_from_slice(row);
        mask[r * width + pad..(r + 1) * width]
            .iter_mut()
            .for_each(|m| *m = 1);
    }
    let shape = [n as i64, width as i64];
    (
        Tensor::from_slice(&ids).view(shape).to(device),
        Tensor::from_slice(&mask).view(shape).to(device),
    )
}

/// Generates one batch of rows, left-padded to `width`, in place.
fn generate_batch(
    model: &Model,
    inputs: &[Vec<i64>],
    width: usize,
    rows: &mut [Row],
    opts: &SampleOptions,
    eos: &[i64],
    never: &[usize],
) -> Result<()> {
    let device = model.device();
    let (ids, mut mask) = padded_batch(inputs, width, device);
    let mut cache = model.new_cache().batch_invariant();
    // Active rows (indices into `rows`); the tensors hold these, then copies of the
    // last one up to a multiple of ROW_MULTIPLE.
    let mut active: Vec<usize> = (0..rows.len()).collect();
    // Only the last position's logits are needed after the prompt.
    let mut logits = model.forward_cached_tail(&ids, &mask, &mut cache, Some(1))?;
    for step in 0..opts.max_new_tokens {
        let last = logits
            .f_select(1, -1)?
            .to_kind(Kind::Float)
            .to_device(Device::Cpu);
        let vocab = last.size()[1] as usize;
        let flat: Vec<f32> = Vec::<f32>::try_from(last.f_flatten(0, -1)?)?;
        let mut masked = never.to_vec();
        if step < opts.min_new_tokens {
            masked.extend(eos.iter().map(|&e| e as usize));
        }
        // Each row draws from its own stream, so the rows are drawn in parallel.
        let mut running: Vec<(usize, &mut Row)> = rows
            .iter_mut()
            .enumerate()
            .filter_map(|(i, row)| active.binary_search(&i).ok().map(|slot| (slot, row)))
            .collect();
        running.par_iter_mut().try_for_each(|(slot, row)| -> Result<()> {
            let row_logits = &flat[*slot * vocab..(*slot + 1) * vocab];
            if row_logits.iter().any(|l| l.is_nan() || *l == f32::INFINITY) {
                bail!("the model gave a NaN or infinite logit at new token {step} (overflow? try --dtype f32)");
            }
            let (token, logprob) = if opts.greedy {
                greedy_pick(row_logits, &masked)
            } else {
                let dist = sampling_distribution(
                    row_logits,
                    &masked,
                    opts.temperature,
                    opts.top_k,
                    opts.top_p,
                );
                let (t, p) = draw(&dist, row.rng.uniform());
                (t, p.ln())
            };
            row.tokens.push(token as u32);
            row.logprobs.push(logprob as f32);
            if eos.contains(&(token as i64)) {
                row.finished = Some(finish::EOS);
            }
            Ok(())
        })?;
        if step + 1 == opts.max_new_tokens {
            break;
        }
        // Finished rows stop costing compute: keep the cache rows still running.
        let keep: Vec<usize> = (0..active.len())
            .filter(|&s| rows[active[s]].finished.is_none())
            .collect();
        if keep.is_empty() {
            break;
        }
        if keep.len() < active.len() {
            let n = keep.len().div_ceil(ROW_MULTIPLE) * ROW_MULTIPLE;
            let idx: Vec<i64> = (0..n).map(|i| keep[i.min(keep.len() - 1)] as i64).collect();
            let idx = Tensor::from_slice(&idx).to(device);
            cache.select_rows(&idx)?;
            mask = mask.f_index_select(0, &idx)?;
            active = keep.iter().map(|&s| active[s]).collect();
        }
        let n = mask.size()[0] as usize;
        let tokens: Vec<i64> = (0..n)
            .map(|i| {
                let slot = i.min(active.len() - 1);
                *rows[active[slot]]
                    .tokens
                    .last()
                    .expect("one token per step") as i64
            })
            .collect();
        let new_ids = Tensor::from_slice(&tokens).view([n as i64, 1]).to(device);
        mask = Tensor::f_cat(
            &[&mask, &Tensor::ones([n as i64, 1], (Kind::Int64, device))],
            1,
        )?;
        logits = rowwise::decoding(|| model.forward_cached(&new_ids, &mask, &mut cache))?;
    }
    Ok(())
}

/// The most likely unmasked token (lowest id on ties) and its log-probability.
fn greedy_pick(logits: &[f32], masked: &[usize]) -> (usize, f64) {
    let mut best = (usize::MAX, f64::NEG_INFINITY);
    let mut max = f64::NEG_INFINITY;
    for (i, &l) in logits.iter().enumerate() {
        let l = if masked.contains(&i) {
            f64::NEG_INFINITY
        } else {
            l as f64
        };
        max = max.max(l);
        if l > best.1 {
            best = (i, l);
        }
    }
    let lse = max
        + logits
            .iter()
            .enumerate()
            .filter(|(i, _)| !masked.contains(i))
            .map(|(_, &l)| (l as f64 - max).exp())
            .sum::<f64>()
            .ln();
    (best.0, best.1 - lse)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use tch::Kind;

    #[test]
    fn control_tokens_and_spare_rows_are_never_sampled() {
        let load = |dir: &Path| Model::load(dir, testing::device(), Kind::Float).unwrap();
        let plain = testing::tiny_models().join("llama-tied");
        assert_eq!(never_sampled(&load(&plain)), Vec::<usize>::new());
        let mut m = load(&plain);
        m.add_control_tokens(3, 1).unwrap();
        let rows = m.vocab_size() as usize;
        assert_eq!(never_sampled(&m), (rows - 3..rows).collect::<Vec<_>>());
        // 8 spare rows past the tokenizer's ids: all 8 before the fit, and after it
        // the 3 control tokens that took the first of them and the 5 left.
        let mut m = load(testing::spare_rows_model());
        let rows = m.vocab_size() as usize;
        let spare: Vec<usize> = (rows - 8..rows).collect();
        assert_eq!(never_sampled(&m), spare);
        m.add_control_tokens(3, 1).unwrap();
        assert_eq!(m.control_tokens().unwrap().first_id as usize, rows - 8);
        let mut got = never_sampled(&m);
        got.sort_unstable();
        assert_eq!(got, spare);
    }
}
