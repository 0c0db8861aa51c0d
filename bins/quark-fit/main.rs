//! quark-fit: train the policy on the pool with the Quark objective.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use quark::fit::{fit, FitOptions, Schedule};
use quark::model::control::ControlInit;
use quark::model::{DTypeArg, DeviceArg};

/// Train the policy on the data pool with the Quark objective (Quark's "learn" step).
///
/// Each row of the pool becomes [<|quark:q|>, prompt tokens, completion tokens],
/// with q its reward quantile; the loss per completion token is
/// NLL + β·KL(policy ‖ reference) − α·entropy (+ γ·unlikelihood), averaged over the
/// batch's completion tokens. The reference sees the prompt without the control
/// token and is never trained. A policy without control tokens gets K of them
/// first (K from the pool), each the mean of the embedding rows plus 1% noise.
///
/// Reads a pool (quark-bin output), the policy folder (the reference model on the
/// first iteration, the last checkpoint afterwards: its optimizer state, step count,
/// schedule and KL coefficient carry over, so N+N steps equal 2N) and the reference
/// folder. Writes a checkpoint folder in the Hugging Face layout (loads in
/// transformers) with optimizer.safetensors, trainer_state.json and a per-step
/// metrics.parquet, which quark-sample reads next. Cost: a policy forward and
/// backward and a reference forward per micro-batch.
#[derive(Parser, Debug)]
#[command(version, about, long_about, allow_negative_numbers = true)]
struct Args {
    /// The pool (quark-bin output).
    #[arg(long)]
    pool: PathBuf,
    /// The policy to continue: the reference at first, then the last checkpoint.
    #[arg(long)]
    policy: PathBuf,
    /// The frozen reference model p0.
    #[arg(long)]
    reference: PathBuf,
    /// Checkpoint folder to write, or an existing folder to write `policy-<key>` into.
    #[arg(long)]
    out: PathBuf,
    /// Optimizer steps in this fit (0 adds the control tokens and saves).
    #[arg(long)]
    steps: u64,
    /// Pool rows per optimizer step.
    #[arg(long, default_value_t = 128, value_parser = quark::check::count)]
    batch_size: usize,
    /// Micro-batches per step (rows per forward = batch size / this). With bf16
    /// their gradients add up in f32, in one more f32 copy of the gradients.
    #[arg(long, default_value_t = 1, value_parser = quark::check::count)]
    grad_accum: usize,
    /// Peak learning rate (Adam).
    #[arg(long, default_value_t = 1e-5, value_parser = quark::check::positive)]
    lr: f64,
    /// Adam's epsilon.
    #[arg(long, default_value_t = 1e-5, value_parser = quark::check::positive)]
    adam_eps: f64,
    /// Linear warm-up steps.
    #[arg(long, default_value_t = 500)]
    warmup_steps: u64,
    /// Steps of the whole schedule (linear decay to 0 after warm-up); defaults to --steps.
    #[arg(long, value_parser = quark::check::count_u64)]
    total_steps: Option<u64>,
    /// After the warm-up: linear (decay to 0 at --total-steps, the paper's) or
    /// constant (the peak rate held: a loop of any length trains as one run).
    #[arg(long, default_value_t = Schedule::Linear)]
    schedule: Schedule,
    /// β, the KL coefficient (the initial one with --adaptive-kl).
    #[arg(long, default_value_t = 0.05, value_parser = quark::check::non_negative)]
    kl_coef: f64,
    /// α, the entropy bonus.
    #[arg(long, default_value_t = 0.06, value_parser = quark::check::non_negative)]
    entropy_coef: f64,
    /// Adapt β towards --target-kl (Ziegler et al. 2019).
    #[arg(long)]
    adaptive_kl: bool,
    /// Target KL per token for --adaptive-kl.
    #[arg(long, default_value_t = 3.0, value_parser = quark::check::positive)]
    target_kl: f64,
    /// Horizon (rows) of the adaptive KL controller.
    #[arg(long, default_value_t = 10000.0, value_parser = quark::check::positive)]
    horizon: f64,
    /// Clip the gradients' global L2 norm to this.
    #[arg(long, value_parser = quark::check::positive)]
    max_grad_norm: Option<f64>,
    /// The control tokens' embedding rows learn at this many times --lr: they start
    /// from scratch, the rest of the model is pretrained.
    #[arg(long, default_value_t = 1.0, value_parser = quark::check::positive)]
    control_lr_scale: f64,
    /// Where the control tokens' rows start when the policy has none yet: `mean`
    /// (the vocabulary's mean embedding plus 1% of its spread: a neutral prefix,
    /// the K rows nearly equal) or `numerals` (token k starts as the tokens that
    /// spell k, "0", "1", ...: real rows the network can tell apart from the start).
    #[arg(long, default_value_t = ControlInit::Mean)]
    control_init: ControlInit,
    /// γ, token-level unlikelihood on repeated context tokens (0 = off).
    #[arg(long, default_value_t = 0.0, value_parser = quark::check::non_negative)]
    unlikelihood_coef: f64,
    /// Seed for batch order and control-token initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The Quark iteration recorded in the metrics.
    #[arg(long, default_value_t = 0)]
    iteration: u32,
    /// Where the models run.
    #[arg(long, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// bf16: forward and backward in bf16 with f32 master weights and Adam state;
    /// auto is bf16 where the device computes it natively (CUDA, a CPU with
    /// AVX512-BF16 or AMX), else f32. The checkpoint's key records the dtype used.
    #[arg(long, default_value_t = DTypeArg::Auto)]
    dtype: DTypeArg,
    /// Gradient checkpointing: keep only each layer's input and run the layer again
    /// in the backward pass (a fraction of the activation memory, about a fifth more
    /// time per step).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let args: Args = quark::cli::parse("quark-fit");
    quark::cli::run("quark-fit", || {
        let device = args.device.device()?;
        let opts = FitOptions {
            steps: args.steps,
            batch_size: args.batch_size,
            grad_accum: args.grad_accum,
            lr: args.lr,
            adam_eps: args.adam_eps,
            adam_betas: (0.9, 0.999),
            warmup_steps: args.warmup_steps,
            total_steps: args.total_steps.unwrap_or(args.steps),
            schedule: args.schedule,
            kl_coef: args.kl_coef,
            entropy_coef: args.entropy_coef,
            adaptive_kl: args.adaptive_kl.then_some((args.target_kl, args.horizon)),
            max_grad_norm: args.max_grad_norm,
            unlikelihood_coef: args.unlikelihood_coef,
            control_lr_scale: args.control_lr_scale,
            control_init: args.control_init,
            seed: args.seed,
            iteration: args.iteration,
            dtype: args.dtype.resolve(device),
            gradient_checkpointing: args.gradient_checkpointing,
            progress: !args.quiet,
        };
        Ok(vec![fit(
            &args.pool,
            &args.policy,
            &args.reference,
            &opts,
            device,
            &args.out,
        )?])
    })
}
