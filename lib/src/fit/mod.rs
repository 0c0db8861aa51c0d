//! Learning (Quark step 4): minibatches drawn uniformly from the pool, each row
//! conditioned on its quantile token, trained with
//!
//!   loss_t = -log p_θ(y_t | r_k, x, y_<t)
//!            + β · KL(p_θ(·| r_k, x, y_<t) ‖ p_0(·| x, y_<t))
//!            - α · H(p_θ(·| r_k, x, y_<t))
//!            (+ γ · unlikelihood, Welleck et al. 2020, when asked)
//!
//! averaged over the completion tokens of the batch. p_0 is the frozen reference,
//! which sees the prompt without the control token. The control-token columns are
//! dropped from the policy's logits before every term, so the three terms are over
//! the same vocabulary as the reference.
//!
//! This file holds the options and the driver; [`adam`] the optimizer (written out,
//! not libtorch's, so that its moments, the step count, the learning-rate schedule
//! and the adaptive KL coefficient are saved with the checkpoint: fits that continue
//! one another train exactly as one long fit), [`loss`] the objective and
//! [`batches`] the pool's rows as training data.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use crate::device::DType;
use crate::model::control::ControlInit;
use crate::model::Model;
use crate::pool::read_pool;
use crate::schema::{FitMetricsRow, ScoredRow, TableWriter};
use crate::stage::{AtomicDir, Stage};

pub mod adam;
mod adam_cpu;
pub mod batches;
pub mod loss;
mod loss_cpu;

pub use adam::Adam;
use batches::{batch_rows, check_quantiles, check_tokens, pool_quantiles};
pub use loss::{
    quark_loss, quark_loss_chunked, Backprop, LossRun, LossTerms, LossWeights, TrainRow,
};

/// File names a fit checkpoint adds to the Hugging Face layout.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
pub use crate::stage::METRICS_FILE;

/// The hyper-parameters of one fit. All of them go into the output's key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FitOptions {
    /// Optimizer steps in this fit.
    pub steps: u64,
    /// Rows per optimizer step.
    pub batch_size: usize,
    /// Micro-batches per step (the step's rows split evenly among them). In bf16
    /// their gradients add up in f32 (one more f32 copy of the gradients).
    pub grad_accum: usize,
    pub lr: f64,
    pub adam_eps: f64,
    pub adam_betas: (f64, f64),
    pub warmup_steps: u64,
    /// Length of the linear decay schedule (over all fits of a run).
    pub total_steps: u64,
    /// What follows the warm-up: the linear decay to 0 at `total_steps` (the
    /// paper's), or the peak rate held. Left out of the key when linear, so that
    /// keys made before it existed still hold.
    #[serde(default, skip_serializing_if = "Schedule::is_linear")]
    pub schedule: Schedule,
    /// β: the KL coefficient (the initial one with the adaptive controller).
    pub kl_coef: f64,
    /// α: the entropy bonus.
    pub entropy_coef: f64,
    /// Adaptive KL controller (Ziegler et al. 2019): target KL and horizon.
    pub adaptive_kl: Option<(f64, f64)>,
    pub max_grad_norm: Option<f64>,
    /// γ: the token-level unlikelihood coefficient (0 = off).
    pub unlikelihood_coef: f64,
    /// The control tokens' embedding rows learn at this many times `lr` (see
    /// [`Adam::scale_control_rows`]). Left out of the key at 1.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub control_lr_scale: f64,
    /// Where new control tokens' rows start, when the policy has none yet. In the
    /// key as the stage's `control_init` (see [`stage`]).
    #[serde(skip)]
    pub control_init: ControlInit,
    pub seed: u64,
    /// The Quark iteration recorded in the metrics.
    pub iteration: u32,
    /// f32, or bf16 (bf16 forward and backward, f32 master weights and Adam).
    pub dtype: DType,
    /// Gradient checkpointing: keep each layer's input only and run the layer again
    /// in the backward pass (less memory, about a fifth more time). Like the
    /// device, not part of the output's key: it changes how, not what, is computed.
    #[serde(skip)]
    pub gradient_checkpointing: bool,
    /// Draw a progress bar on stderr.
    #[serde(skip)]
    pub progress: bool,
}

impl FitOptions {
    /// Checks the numbers the program's flag parsers check (for library callers):
    /// a NaN learning rate would train every weight to NaN, and a NaN or infinite
    /// option would give the stage key a `null`.
    pub fn validate(&self) -> Result<()> {
        use crate::check::{check, NON_NEGATIVE, POSITIVE};
        check("--lr", self.lr, POSITIVE)?;
        check("--adam-eps", self.adam_eps, POSITIVE)?;
        check("--kl-coef", self.kl_coef, NON_NEGATIVE)?;
        check("--entropy-coef", self.entropy_coef, NON_NEGATIVE)?;
        check("--unlikelihood-coef", self.unlikelihood_coef, NON_NEGATIVE)?;
        check("--control-lr-scale", self.control_lr_scale, POSITIVE)?;
        for beta in [self.adam_betas.0, self.adam_betas.1] {
            if !(0.0..1.0).contains(&beta) {
                bail!("Adam's betas must be in [0, 1), got {beta}");
            }
        }
        if let Some((target, horizon)) = self.adaptive_kl {
            check("--target-kl", target, POSITIVE)?;
            check("--horizon", horizon, POSITIVE)?;
        }
        if let Some(norm) = self.max_grad_norm {
            check("--max-grad-norm", norm, POSITIVE)?;
        }
        if self.batch_size == 0
            || self.grad_accum == 0
            || !self.batch_size.is_multiple_of(self.grad_accum)
        {
            bail!(
                "--batch-size {} must be a positive multiple of --grad-accum {}",
                self.batch_size,
                self.grad_accum
            );
        }
        Ok(())
    }
}

fn one() -> f64 {
    1.0
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

/// What carries over from one fit to the next beside the weights.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimizer steps taken over the whole run.
    pub step: u64,
    /// Pool rows consumed over the whole run (the sampler's position).
    pub rows_seen: u64,
    /// The current KL coefficient (changes with the adaptive controller).
    pub kl_coef: f64,
}

/// The learning-rate schedule after the warm-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// Linear decay to 0 at the total steps (transformers'
    /// get_linear_schedule_with_warmup, the paper's).
    #[default]
    Linear,
    /// The peak rate from the end of the warm-up on: a loop of any length trains as
    /// one run, and iterations past the planned ones still learn.
    Constant,
}

impl Schedule {
    pub fn is_linear(&self) -> bool {
        *self == Schedule::Linear
    }

    /// The learning rate at `step` (0-based) of a fit with peak `lr`, `warmup`
    /// warm-up steps and `total` steps in the linear schedule.
    pub fn rate(self, lr: f64, step: u64, warmup: u64, total: u64) -> f64 {
        match self {
            Schedule::Linear => learning_rate(lr, step, warmup, total),
            Schedule::Constant if step < warmup => learning_rate(lr, step, warmup, total),
            Schedule::Constant => lr,
        }
    }
}

impl std::str::FromStr for Schedule {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(Schedule::Linear),
            "constant" => Ok(Schedule::Constant),
            _ => bail!("`{s}`: linear or constant"),
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Schedule::Linear => "linear",
            Schedule::Constant => "constant",
        })
    }
}

/// The learning rate at `step` (0-based): linear warm-up to `lr` over `warmup`
/// steps, then linear decay to 0 at `total` (transformers'
/// get_linear_schedule_with_warmup).
pub fn learning_rate(lr: f64, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return lr * step as f64 / warmup.max(1) as f64;
    }
    let left = total.saturating_sub(step) as f64;
    let span = total.saturating_sub(warmup).max(1) as f64;
    lr * (left / span).max(0.0)
}
/// The pool's K, its rows, and the rows a fit trains on (those with a quantile, in
/// the pool's order: what [`batches::batch_indices`] indexes), checked.
pub fn training_rows(pool: &Path) -> Result<(u32, Vec<ScoredRow>, Vec<TrainRow>)> {
    let k = pool_quantiles(pool)?;
    let pool_rows = read_pool(pool)?;
    check_quantiles(pool, &pool_rows, k)?;
    let rows: Vec<TrainRow> = pool_rows
        .iter()
        .filter(|r| r.quantile.is_some())
        .map(TrainRow::from)
        .collect();
    if rows.is_empty() {
        bail!("{}: the pool has no rows with a quantile", pool.display());
    }
    Ok((k, pool_rows, rows))
}

/// The stage (and so the checkpoint's key) of a fit of `policy_dir` on `pool`
/// against `reference_dir` with `opts`, once the options are checked.
pub fn stage(
    pool: &Path,
    policy_dir: &Path,
    reference_dir: &Path,
    opts: &FitOptions,
) -> Result<Stage> {
    opts.validate()?;
    /// The options and how new control tokens start: a policy made with another
    /// initialisation is another output.
    #[derive(Serialize)]
    struct Params<'a> {
        #[serde(flatten)]
        opts: &'a FitOptions,
        control_init: &'static str,
    }
    let params = Params {
        opts,
        control_init: opts.control_init.key(),
    };
    Stage::new("policy", &params, &[pool, policy_dir, reference_dir])
}

/// Runs a fit: loads the pool, the policy (adding control tokens if it has none)
/// and the reference, trains `opts.steps` steps continuing the policy's trainer
/// state, and writes the checkpoint folder (Hugging Face layout + optimizer state +
/// metrics) to `out` (a folder path; inside an existing folder, named by key).
pub fn fit(
    pool: &Path,
    policy_dir: &Path,
    reference_dir: &Path,
    opts: &FitOptions,
    device: Device,
    out: &Path,
) -> Result<PathBuf> {
    let stage = stage(pool, policy_dir, reference_dir, opts)?;
    let path = stage.resolve_out_dir(out)?;
    if stage.is_done(&path) {
        return Ok(path);
    }
    crate::stage::prepare_parent(&path)?;
    let (k, pool_rows, rows) = training_rows(pool)?;

    let mut policy = Model::load(policy_dir, device, Kind::Float)?;
    if policy.control_tokens().is_none() {
        policy.add_control_tokens_with(k, opts.seed, opts.control_init)?;
    }
    let have = policy.control_tokens().expect("added above").k;
    if have < k {
        bail!(
            "{}: the policy has {have} control tokens, the pool {k} quantiles",
            policy_dir.display()
        );
    }
    let compute = Kind::from(opts.dtype);
    let mut reference = Model::load(reference_dir, device, compute)?;
    reference.var_store_mut().freeze();
    check_tokens(
        pool,
        &pool_rows,
        &reference,
        policy.control_tokens().expect("added above"),
        policy.position_limit(),
    )?;
    drop(pool_rows);

    let state_path = policy_dir.join(TRAINER_STATE_FILE);
    let opt_path = policy_dir.join(OPTIMIZER_FILE);
    let mut state: TrainerState = match std::fs::read(&state_path) {
        Ok(b) => serde_json::from_slice(&b)
            .with_context(|| format!("{}: invalid trainer state", state_path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !opt_path.exists() => TrainerState {
            kl_coef: opts.kl_coef,
            ..Default::default()
        },
        Err(e) => bail!(
            "{}: cannot read the trainer state beside {} ({e}): a checkpoint needs both to continue",
            state_path.display(),
            OPTIMIZER_FILE
        ),
    };
    // Without the adaptive controller β is the option's (a changed --kl-coef takes
    // effect); with it, the controller's value carries over.
    if opts.adaptive_kl.is_none() {
        state.kl_coef = opts.kl_coef;
    }
    let mut adam = Adam::new(
        &policy,
        opts.adam_betas,
        opts.adam_eps,
        opt_path.exists().then_some(opt_path.as_path()),
        compute != Kind::Float,
    )?;
    if opts.control_lr_scale != 1.0 {
        adam.scale_control_rows(&policy, opts.control_lr_scale)?;
    }
    if compute != Kind::Float {
        // bf16 forward and backward; Adam keeps the f32 master weights it copied.
        policy.var_store_mut().set_kind(compute);
    }

    let micro = opts.batch_size / opts.grad_accum;
    let progress = crate::progress::bar(opts.progress, opts.steps, "fit", "steps");
    let started_fit = Instant::now();
    let mut metrics = Vec::with_capacity(opts.steps as usize);
    // Micro-batches of bf16 gradients add up in f32 (one f32 copy of the gradients).
    let sum_in_f32 = compute != Kind::Float && opts.grad_accum > 1;
    for _ in 0..opts.steps {
        let started = Instant::now();
        let batch = batch_rows(&rows, opts.seed, state.rows_seen, opts.batch_size);
        let total_tokens: usize = batch.iter().map(|r| r.completion.len()).sum();
        let denom = total_tokens.max(1) as f64;
        let (mut nll, mut kl, mut ent, mut ul, mut loss) = (0.0, 0.0, 0.0, 0.0, 0.0);
        for chunk in batch.chunks(micro) {
            let weights = LossWeights {
                kl: state.kl_coef,
                entropy: opts.entropy_coef,
                unlikelihood: opts.unlikelihood_coef,
            };
            let backprop = Backprop {
                scale: 1.0 / denom,
                checkpoint: opts.gradient_checkpointing,
            };
            let terms = quark_loss(&policy, &reference, chunk, weights, Some(backprop))?;
            if sum_in_f32 {
                adam.absorb();
            }
            loss += terms.loss / denom;
            nll += terms.nll;
            kl += terms.kl;
            ent += terms.entropy;
            ul += terms.unlikelihood;
        }
        let norm = adam.grad_norm();
        let scale = match opts.max_grad_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        let lr = opts
            .schedule
            .rate(opts.lr, state.step, opts.warmup_steps, opts.total_steps);
        adam.step(lr, state.step + 1, scale);
        let kl_mean = kl / denom;
        let elapsed = started.elapsed().as_secs_f64().max(1e-9);
        metrics.push(FitMetricsRow::from_named(
            opts.iteration,
            state.step + 1,
            &[
                ("loss", loss),
                ("nll", nll / denom),
                ("kl", kl_mean),
                ("entropy", ent / denom),
                ("unlikelihood", ul / denom),
                ("lr", lr),
                ("grad_norm", norm),
                ("kl_coef", state.kl_coef),
                ("tokens", total_tokens as f64),
                ("tokens_per_s", total_tokens as f64 / elapsed),
            ],
        )?);
        if let Some((target, horizon)) = opts.adaptive_kl {
            // Ziegler et al. (2019): proportional control of log-space KL error.
            let error = (kl_mean / target - 1.0).clamp(-0.2, 0.2);
            state.kl_coef *= 1.0 + error * opts.batch_size as f64 / horizon;
        }
        state.step += 1;
        state.rows_seen += opts.batch_size as u64;
        progress.inc(1);
        progress.set_message(format!("loss {loss:.4} kl {kl_mean:.4}"));
    }
    progress.finish_and_clear();
    eprintln!(
        "fit: {} steps of {} rows in {:.1} s ({})",
        opts.steps,
        opts.batch_size,
        started_fit.elapsed().as_secs_f64(),
        opts.dtype
    );

    adam.restore_master(&mut policy)?;
    let dir = AtomicDir::create(&path)?;
    policy.save(dir.dir())?;
    adam.save(&dir.dir().join(OPTIMIZER_FILE))?;
    crate::stage::write_atomic(
        &dir.dir().join(TRAINER_STATE_FILE),
        serde_json::to_string_pretty(&state)?.as_bytes(),
    )?;
    let mut w =
        TableWriter::<FitMetricsRow>::create(&dir.dir().join(METRICS_FILE), &[], stage.meta())?;
    w.write(metrics)?;
    w.finish()?;
    dir.commit(stage.meta())
}
