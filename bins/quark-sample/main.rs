//! quark-sample: draw completions for prompts from a model, optionally conditioned
//! on a reward-quantile token.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use quark::model::{DTypeArg, DeviceArg};
use quark::sample::{sample_file, SampleOptions};

/// Sample completions for a set of prompts (Quark's "explore" step).
///
/// Each prompt is tokenized (longer ones keep their last --max-prompt-tokens
/// tokens), optionally prefixed with the control token `<|quark:K|>`, and completed
/// --samples-per-prompt times with the key/value cache, prompts of similar length
/// batched together. Control tokens are never sampled; EOS is masked before
/// --min-new-tokens. Output is deterministic: the same command gives the same file,
/// whatever --batch-size, and --shard I/N slices together equal the whole run.
///
/// Reads prompts (Parquet with `text`/`prompt`, JSON lines with `prompt.text` or
/// `text`, or plain text lines; `-` for stdin) and a model folder in the Hugging Face
/// layout; writes the generations table, which quark-score reads. Cost: one forward
/// pass per generated token per batch; a progress bar on stderr shows tokens/s.
#[derive(Parser, Debug)]
#[command(version, about, long_about, allow_negative_numbers = true)]
struct Args {
    /// Model folder (Hugging Face layout: config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Prompt file (.parquet, .jsonl, or text lines), or `-` for stdin.
    #[arg(long)]
    prompts: PathBuf,
    /// Output file, or a folder to write `generations-<key>.parquet` into.
    #[arg(long, default_value = ".")]
    out: PathBuf,
    /// Condition on the reward quantile K (0 = best), or `none` for no control token.
    #[arg(long, default_value = "none", value_parser = parse_condition)]
    condition: Condition,
    /// Completions per prompt.
    #[arg(long, default_value_t = 1, value_parser = quark::check::count_u32)]
    samples_per_prompt: u32,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 20, value_parser = quark::check::count)]
    max_new_tokens: usize,
    /// EOS is not allowed before this many tokens.
    #[arg(long, default_value_t = 3)]
    min_new_tokens: usize,
    /// Softmax temperature (above 0; --greedy for the most likely token).
    #[arg(long, default_value_t = 1.0, value_parser = quark::check::positive)]
    temperature: f64,
    /// Nucleus sampling: keep the most likely tokens holding this much probability.
    #[arg(long, default_value_t = 1.0, value_parser = quark::check::unit_fraction)]
    top_p: f64,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Always take the most likely token.
    #[arg(long)]
    greedy: bool,
    /// Seed: each row draws from a stream seeded by (seed, prompt_id, sample_index).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Rows per forward pass (does not change the output).
    #[arg(long, default_value_t = 16, value_parser = quark::check::count)]
    batch_size: usize,
    /// Longer prompts keep their last N tokens.
    #[arg(long, default_value_t = 128, value_parser = quark::check::count)]
    max_prompt_tokens: usize,
    /// Only the I-th (from 0) of N equal slices of the prompts, as `I/N`.
    #[arg(long, value_parser = parse_shard)]
    shard: Option<(usize, usize)>,
    /// Only the first N prompts (applied before --shard).
    #[arg(long)]
    limit: Option<usize>,
    /// The Quark iteration recorded in each row.
    #[arg(long, default_value_t = 0)]
    iteration: u32,
    /// Where the model runs.
    #[arg(long, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// Precision the model computes in: auto is bf16 where the device computes it
    /// natively (CUDA, a CPU with AVX512-BF16 or AMX), else f32. The output records
    /// the dtype used.
    #[arg(long, default_value_t = DTypeArg::Auto)]
    dtype: DTypeArg,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Clone, Copy, Debug)]
struct Condition(Option<u32>);

fn parse_condition(s: &str) -> Result<Condition, String> {
    if s == "none" {
        return Ok(Condition(None));
    }
    s.parse()
        .map(|k| Condition(Some(k)))
        .map_err(|_| format!("expected a quantile number or `none`, got `{s}`"))
}

fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let (i, n) = s.split_once('/').ok_or("expected I/N, e.g. 0/4")?;
    let (i, n): (usize, usize) = (
        i.parse().map_err(|_| format!("bad shard index `{i}`"))?,
        n.parse().map_err(|_| format!("bad shard count `{n}`"))?,
    );
    if n == 0 || i >= n {
        return Err(format!("shard {i}/{n}: needs 0 <= I < N"));
    }
    Ok((i, n))
}

fn main() -> ExitCode {
    let args: Args = quark::cli::parse("quark-sample");
    quark::cli::run("quark-sample", || {
        let prompts = quark::cli::input_path(&args.prompts)?;
        let device = args.device.device()?;
        let opts = SampleOptions {
            condition: args.condition.0,
            samples_per_prompt: args.samples_per_prompt,
            max_new_tokens: args.max_new_tokens,
            min_new_tokens: args.min_new_tokens,
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: (args.top_k > 0).then_some(args.top_k),
            greedy: args.greedy,
            seed: args.seed,
            max_prompt_tokens: args.max_prompt_tokens,
            shard: args.shard,
            limit: args.limit,
            iteration: args.iteration,
            dtype: args.dtype.resolve(device),
            batch_size: args.batch_size,
            progress: !args.quiet,
        };
        Ok(vec![sample_file(
            &args.model,
            &prompts,
            &opts,
            device,
            &args.out,
        )?])
    })
}
