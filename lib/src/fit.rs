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
//! Adam is written out here (not libtorch's) so that its moments, the step count,
//! the learning-rate schedule and the adaptive KL coefficient are saved with the
//! checkpoint: fits that continue one another train exactly as one long fit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::model::{write_safetensors, Model};
use crate::pool::read_pool;
use crate::schema::{meta_key, read_metadata, FitMetricsRow, ScoredRow, TableWriter};
use crate::stage::{AtomicDir, Stage};

/// File names a fit checkpoint adds to the Hugging Face layout.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";
pub const METRICS_FILE: &str = "metrics.parquet";

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
    /// β: the KL coefficient (the initial one with the adaptive controller).
    pub kl_coef: f64,
    /// α: the entropy bonus.
    pub entropy_coef: f64,
    /// Adaptive KL controller (Ziegler et al. 2019): target KL and horizon.
    pub adaptive_kl: Option<(f64, f64)>,
    pub max_grad_norm: Option<f64>,
    /// γ: the token-level unlikelihood coefficient (0 = off).
    pub unlikelihood_coef: f64,
    pub seed: u64,
    /// The Quark iteration recorded in the metrics.
    pub iteration: u32,
    /// "f32", or "bf16" (bf16 forward and backward, f32 master weights and Adam).
    pub dtype: String,
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
        use crate::cli::{check, non_negative, positive};
        check("--lr", self.lr, positive)?;
        check("--adam-eps", self.adam_eps, positive)?;
        check("--kl-coef", self.kl_coef, non_negative)?;
        check("--entropy-coef", self.entropy_coef, non_negative)?;
        check("--unlikelihood-coef", self.unlikelihood_coef, non_negative)?;
        for beta in [self.adam_betas.0, self.adam_betas.1] {
            if !(0.0..1.0).contains(&beta) {
                bail!("Adam's betas must be in [0, 1), got {beta}");
            }
        }
        if let Some((target, horizon)) = self.adaptive_kl {
            check("--target-kl", target, positive)?;
            check("--horizon", horizon, positive)?;
        }
        if let Some(norm) = self.max_grad_norm {
            check("--max-grad-norm", norm, positive)?;
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

/// Adam with bias correction, as torch.optim.Adam computes it, over f32 master
/// copies of the parameters (the parameters themselves when they are f32).
pub struct Adam {
    names: Vec<String>,
    params: Vec<Tensor>,
    master: Vec<Tensor>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// f32 sums of the gradients moved out of the parameters by [`Adam::absorb`].
    sums: Vec<Option<Tensor>>,
    betas: (f64, f64),
    eps: f64,
}

impl Adam {
    /// Sets up Adam over every variable of `model` (sorted by name), with moments
    /// restored from `state` when a previous fit saved them. With `separate_master`
    /// the f32 master weights are kept apart from the model (which is about to compute
    /// in bf16); otherwise Adam updates the f32 parameters themselves.
    pub fn new(
        model: &Model,
        betas: (f64, f64),
        eps: f64,
        state: Option<&Path>,
        separate_master: bool,
    ) -> Result<Self> {
        let vars: BTreeMap<String, Tensor> = model.var_store().variables().into_iter().collect();
        let saved: BTreeMap<String, Tensor> = match state {
            Some(p) => Tensor::read_safetensors(p)
                .with_context(|| format!("{}: cannot read optimizer state", p.display()))?
                .into_iter()
                .collect(),
            None => BTreeMap::new(),
        };
        let mut adam = Adam {
            names: Vec::new(),
            params: Vec::new(),
            master: Vec::new(),
            m: Vec::new(),
            v: Vec::new(),
            sums: Vec::new(),
            betas,
            eps,
        };
        for (name, p) in vars {
            let master = if separate_master {
                // The f32 storage itself, under a handle of its own: the model's
                // variable gets new (bf16) storage when it changes kind, and this
                // keeps the f32 one, with no copy.
                p.detach().to_kind(Kind::Float)
            } else {
                p.shallow_clone()
            };
            let moment = |which: &str| -> Result<Tensor> {
                match saved.get(&format!("{which}.{name}")) {
                    Some(t) if t.size() == p.size() => {
                        Ok(t.to_kind(Kind::Float).to_device(p.device()))
                    }
                    Some(t) => bail!(
                        "optimizer state for `{name}` has shape {:?}, the parameter {:?}",
                        t.size(),
                        p.size()
                    ),
                    None if saved.is_empty() => Ok(master.zeros_like()),
                    None => bail!("optimizer state has no `{which}.{name}`"),
                }
            };
            adam.m.push(moment("m")?);
            adam.v.push(moment("v")?);
            adam.names.push(name);
            adam.sums.push(None);
            adam.params.push(p);
            adam.master.push(master);
        }
        Ok(adam)
    }

    /// Moves the parameters' gradients into f32 sums, which [`Adam::grad_norm`] and
    /// [`Adam::step`] then read: called after each micro-batch, it makes the
    /// gradients of bf16 parameters add up in f32 rather than in bf16.
    pub fn absorb(&mut self) {
        let _guard = tch::no_grad_guard();
        for (p, sum) in self.params.iter_mut().zip(&mut self.sums) {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            match sum {
                Some(s) => {
                    let _ = s.g_add_(&g);
                }
                None => *sum = Some(g.to_kind(Kind::Float)),
            }
            p.zero_grad();
        }
    }

    /// Parameter `i`'s gradient: its f32 sum if [`Adam::absorb`] made one, else
    /// the parameter's own (None when it has none).
    fn gradient(&self, i: usize) -> Option<Tensor> {
        if let Some(s) = &self.sums[i] {
            return Some(s.shallow_clone());
        }
        let g = self.params[i].grad();
        g.defined().then_some(g)
    }

    /// The global L2 norm of the gradients.
    pub fn grad_norm(&self) -> f64 {
        let sq: f64 = (0..self.params.len())
            .map(|i| {
                if let Some(g) = self.gradient(i) {
                    // Summed in f32 (on the CPU through a temporary f32 copy).
                    let n = g.norm_scalaropt_dtype(2.0, Kind::Float).double_value(&[]);
                    n * n
                } else {
                    0.0
                }
            })
            .sum();
        sq.sqrt()
    }

    /// One update with learning rate `lr` at 1-based step `t`, gradients scaled by
    /// `scale` (gradient clipping) first; then the gradients are cleared.
    pub fn step(&mut self, lr: f64, t: u64, scale: f64) {
        let _guard = tch::no_grad_guard();
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(t as i32);
        let bc2 = 1.0 - b2.powi(t as i32);
        for i in 0..self.params.len() {
            let Some(grad) = self.gradient(i) else {
                continue;
            };
            let p = &mut self.params[i];
            // As torch.optim.Adam, in place, a slice of elements at a time so that
            // the f32 temporaries stay small beside the embedding: m = lerp(m, g, 1 -
            // b1); v = b2 v + (1 - b2) g²; p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) +
            // eps). The parameter, master and moments are contiguous: flat views. The
            // gradient is scratch (an f32 one is squared in place): cleared below.
            let flat_grad = grad.reshape([-1]);
            for (start, len) in slices(grad.numel() as i64) {
                let part = |t: &Tensor| t.view([-1]).narrow(0, start, len);
                let mut g = flat_grad.narrow(0, start, len).to_kind(Kind::Float);
                if scale != 1.0 {
                    let _ = g.g_mul_scalar_(scale);
                }
                let (mut m, mut v) = (part(&self.m[i]), part(&self.v[i]));
                let _ = m.lerp_(&g, 1.0 - b1);
                let _ = g.square_();
                let _ = g.g_mul_scalar_(1.0 - b2);
                let _ = v.g_mul_scalar_(b2);
                let _ = v.g_add_(&g);
                drop(g);
                let mut denom = v.sqrt();
                let _ = denom.g_div_scalar_(bc2.sqrt());
                let _ = denom.g_add_scalar_(self.eps);
                let mut update = &m / &denom;
                let _ = update.g_mul_scalar_(lr / bc1);
                let mut master = part(&self.master[i]);
                let _ = master.g_sub_(&update);
                if self.master[i].data_ptr() != p.data_ptr() {
                    part(p).copy_(&master);
                }
            }
            p.zero_grad();
            self.sums[i] = None;
        }
    }

    /// Writes the moments (as f32 safetensors) to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for (i, n) in self.names.iter().enumerate() {
            named.push((format!("m.{n}"), self.m[i].shallow_clone()));
            named.push((format!("v.{n}"), self.v[i].shallow_clone()));
        }
        write_safetensors(path, &named)
    }

    /// Puts the f32 master weights back into the model (before saving it).
    pub fn restore_master(&self, model: &mut Model) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let vars: BTreeMap<String, Tensor> = model.var_store().variables().into_iter().collect();
        for (i, n) in self.names.iter().enumerate() {
            if self.master[i].data_ptr() != vars[n].data_ptr() {
                // The variable takes the master's f32 storage itself: no new copy of
                // the model while the checkpoint is written.
                vars[n].shallow_clone().set_data(&self.master[i]);
            }
        }
        Ok(())
    }
}

/// Adam's temporaries are at most this many elements (16 MB in f32).
const ADAM_SLICE_ELEMENTS: i64 = 1 << 22;

/// `(start, len)` slices of `n` elements, [`ADAM_SLICE_ELEMENTS`] at most each.
fn slices(n: i64) -> Vec<(i64, i64)> {
    (0..n)
        .step_by(ADAM_SLICE_ELEMENTS as usize)
        .map(|s| (s, ADAM_SLICE_ELEMENTS.min(n - s)))
        .collect()
}

/// One row of a training batch: token ids and its quantile.
#[derive(Clone, Debug)]
pub struct TrainRow {
    pub quantile: u32,
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

impl From<&ScoredRow> for TrainRow {
    fn from(r: &ScoredRow) -> Self {
        Self {
            quantile: r
                .quantile
                .expect("only rows with a quantile are trained on"),
            prompt: r.generation.prompt_tokens.clone(),
            completion: r.generation.completion_tokens.clone(),
        }
    }
}

/// The loss terms of one micro-batch: sums over its completion tokens.
#[derive(Debug, Default)]
pub struct LossTerms {
    /// The per-token loss, summed.
    pub loss: f64,
    pub nll: f64,
    pub kl: f64,
    pub entropy: f64,
    pub unlikelihood: f64,
    pub tokens: i64,
}

/// The weights of the Quark objective's terms beside the NLL: β (KL to the
/// reference), α (entropy bonus) and the unlikelihood coefficient.
#[derive(Clone, Copy, Debug)]
pub struct LossWeights {
    pub kl: f64,
    pub entropy: f64,
    pub unlikelihood: f64,
}

/// How [`quark_loss`] back-propagates: `scale` times the loss's gradient is added
/// to the policy's, through the network run with gradient checkpointing or not
/// ([`Model::train_forward`]).
#[derive(Clone, Copy, Debug)]
pub struct Backprop {
    pub scale: f64,
    pub checkpoint: bool,
}

/// The vocabulary-sized tensors of the loss (logits, log-probabilities, their
/// gradients) are built for as many rows at a time as keep each under this many
/// elements (16 MB in f32), or for one row: they, not the network, would otherwise
/// set the peak. (In bf16 the head's gradient is then summed over the chunks in
/// bf16: a few roundings of its partial sums.)
const LOSS_CHUNK_ELEMENTS: i64 = 1 << 22;

/// Left-pads token rows into (ids, mask) tensors.
fn left_pad(rows: &[Vec<i64>], device: Device) -> (Tensor, Tensor) {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = vec![0i64; rows.len() * width];
    let mut mask = vec![0i64; rows.len() * width];
    for (r, row) in rows.iter().enumerate() {
        let pad = width - row.len();
        ids[r * width + pad..(r + 1) * width].copy_from_slice(row);
        mask[r * width + pad..(r + 1) * width].fill(1);
    }
    let shape = [rows.len() as i64, width as i64];
    (
        Tensor::from_slice(&ids).view(shape).to(device),
        Tensor::from_slice(&mask).view(shape).to(device),
    )
}

/// The Quark loss of `rows` (policy conditioned on each row's quantile token, the
/// reference on the bare prompt), with the control-token columns dropped; with
/// `backprop`, its gradient goes into the policy's.
pub fn quark_loss(
    policy: &Model,
    reference: &Model,
    rows: &[TrainRow],
    weights: LossWeights,
    backprop: Option<Backprop>,
) -> Result<LossTerms> {
    let span = rows.iter().map(|r| r.completion.len()).max().unwrap_or(0) as i64;
    let per_row = (span * reference.vocab_size()).max(1);
    let chunk = (LOSS_CHUNK_ELEMENTS / per_row).max(1) as usize;
    quark_loss_chunked(policy, reference, rows, weights, backprop, chunk)
}

/// [`quark_loss`] with the head and the loss run on `rows_per_chunk` rows at a time.
/// The network runs once on all rows; its output is cut loose from the graph, each
/// chunk's loss is differentiated down to it, and the summed gradient then goes back
/// through the network in one pass.
pub fn quark_loss_chunked(
    policy: &Model,
    reference: &Model,
    rows: &[TrainRow],
    weights: LossWeights,
    backprop: Option<Backprop>,
    rows_per_chunk: usize,
) -> Result<LossTerms> {
    let _no_grad = backprop.is_none().then(tch::no_grad_guard);
    let control = policy
        .control_tokens()
        .context("the policy has no control tokens")?;
    let device = policy.device();
    let vocab = reference.vocab_size();
    let seq = |r: &TrainRow| -> Vec<i64> {
        r.prompt
            .iter()
            .chain(&r.completion)
            .map(|&t| t as i64)
            .collect()
    };
    let pol_rows: Vec<Vec<i64>> = rows
        .iter()
        .map(|r| {
            std::iter::once(control.first_id + r.quantile as i64)
                .chain(seq(r))
                .collect()
        })
        .collect();
    if rows.iter().any(|r| r.prompt.is_empty()) {
        bail!("a pool row has no prompt tokens: the reference would have nothing to predict its first token from");
    }
    let ref_rows: Vec<Vec<i64>> = rows.iter().map(seq).collect();
    let (pol_ids, pol_mask) = left_pad(&pol_rows, device);
    let (ref_ids, ref_mask) = left_pad(&ref_rows, device);

    // Left padding aligns every row's end, so the policy's positions 1.. line up
    // with the reference's 0.. (one control token more in front). Only the positions
    // that predict a completion token matter: the last `span` + 1 of each side (the
    // very last predicts nothing), so the head and every term run on those alone.
    let span = rows.iter().map(|r| r.completion.len()).max().unwrap_or(0) as i64;
    let checkpoint = backprop.is_some_and(|b| b.checkpoint);
    let pass = policy.train_forward(&pol_ids, &pol_mask, Some(span + 1), checkpoint)?;
    let ref_hidden = tch::no_grad(|| reference.hidden_tail(&ref_ids, &ref_mask, Some(span + 1)))?
        .f_narrow(1, 0, span)?;
    let cut = pass.hidden().detach().set_requires_grad(backprop.is_some());
    let hidden = cut.f_narrow(1, 0, span)?;
    // The control-token columns are dropped from both sides: past the reference's
    // vocabulary as usual, or inside it when the embedding had spare rows that
    // became the control tokens.
    let keep = (control.first_id < vocab).then(|| {
        let ids: Vec<i64> = (0..vocab)
            .filter(|id| !control.ids().contains(id))
            .collect();
        Tensor::from_slice(&ids).to(device)
    });

    // Token ids as columns of the kept logits: with the control tokens inside the
    // vocabulary, the (spare) ids above them move down by K.
    let shift = keep
        .is_some()
        .then_some((control.ids().end, control.k as i64));
    let column = |t: i64| match shift {
        Some((end, k)) if t >= end => t - k,
        _ => t,
    };
    let ref_columns = match shift {
        Some((end, k)) => ref_ids.f_sub(&ref_ids.f_ge(end)?.f_mul_scalar(k)?)?,
        None => ref_ids.shallow_clone(),
    };

    // Local position i predicts a row's completion token j when i = span - c + j.
    let w = span as usize;
    let mut target = vec![0i64; rows.len() * w];
    let mut on = vec![0f32; rows.len() * w];
    for (r, row) in rows.iter().enumerate() {
        let c = row.completion.len();
        for (j, &t) in row.completion.iter().enumerate() {
            let pos = w - c + j;
            target[r * w + pos] = column(t as i64);
            on[r * w + pos] = 1.0;
        }
    }
    let shape = [rows.len() as i64, span];
    let target = Tensor::from_slice(&target).view(shape).to(device);
    let on = Tensor::from_slice(&on).view(shape).to(device);

    let mut terms = LossTerms {
        tokens: rows.iter().map(|r| r.completion.len() as i64).sum(),
        ..Default::default()
    };
    let per_chunk = rows_per_chunk.max(1);
    for start in (0..rows.len()).step_by(per_chunk) {
        let n = per_chunk.min(rows.len() - start) as i64;
        let part = |t: &Tensor| t.f_narrow(0, start as i64, n);
        // The head's input contiguous: a strided one takes a slow path in bf16.
        let rows_of = |t: &Tensor| part(t)?.f_contiguous();
        let pol_logits = policy.logits(&rows_of(&hidden)?)?;
        let ref_logits = tch::no_grad(|| reference.logits(&rows_of(&ref_hidden)?))?;
        let (pol_logits, ref_logits) = match &keep {
            None => (pol_logits.f_narrow(2, 0, vocab)?, ref_logits),
            Some(keep) => (
                pol_logits.f_index_select(2, keep)?,
                ref_logits.f_index_select(2, keep)?,
            ),
        };
        let (target, on) = (part(&target)?, part(&on)?);
        let logp = pol_logits.f_log_softmax(-1, Kind::Float)?;
        drop(pol_logits);
        let logp0 = ref_logits.f_log_softmax(-1, Kind::Float)?;
        drop(ref_logits);
        let p = logp.exp();
        let nll = -logp
            .f_gather(-1, &target.unsqueeze(-1), false)?
            .squeeze_dim(-1);
        // KL = Σ p log p - Σ p log p0 and H = -Σ p log p: two products over the
        // vocabulary (the largest tensors here) serve all three terms.
        let p_logp = (&p * &logp).sum_dim_intlist(-1, false, Kind::Float);
        let p_logp0 = (&p * &logp0).sum_dim_intlist(-1, false, Kind::Float);
        drop(logp0);
        let kl = &p_logp - &p_logp0;
        let entropy = -p_logp;
        let mut per_token = &nll + &kl * weights.kl - &entropy * weights.entropy;
        let sum = |t: &Tensor| (t * &on).sum(Kind::Double).double_value(&[]);
        if weights.unlikelihood > 0.0 {
            let ul = unlikelihood(&p, &part(&ref_columns)?, &part(&ref_mask)?, &target, span)?;
            terms.unlikelihood += sum(&ul);
            per_token += ul * weights.unlikelihood;
        }
        terms.nll += sum(&nll);
        terms.kl += sum(&kl);
        terms.entropy += sum(&entropy);
        let loss = (&per_token * &on).sum(Kind::Float);
        terms.loss += loss.double_value(&[]);
        if let Some(b) = backprop {
            (loss * b.scale).backward();
        }
    }
    if backprop.is_some() {
        // The network's output receives the gradient the chunks left on its copy.
        pass.backward(policy, &cut.grad())?;
    }
    Ok(terms)
}

/// Token-level unlikelihood (Welleck et al. 2020): at position i, the negative
/// candidates are the earlier tokens of the sequence (prompt and completion, up to
/// and including position i) other than the target; loss = -Σ log(1 - p(c)). `p`
/// and `target` cover the last `span` + 1 positions of `ids` but the last one; `ids`
/// and `target` are columns of `p`.
fn unlikelihood(
    p: &Tensor,
    ids: &Tensor,
    mask: &Tensor,
    target: &Tensor,
    span: i64,
) -> Result<Tensor> {
    let (b, t) = (ids.size()[0], ids.size()[1]);
    let v = p.size()[2];
    let dev = p.device();
    let real = mask.f_to_kind(Kind::Float)?;
    // Tokens seen before the window (real positions only), then a running union
    // over the window: seen[b, i, v] = 1 if v occurs at a real position <= i.
    let before = t - span - 1;
    let mut seen0 = Tensor::f_zeros([b, v], (Kind::Float, dev))?;
    if before > 0 {
        seen0 = seen0.f_scatter_add(
            1,
            &ids.f_narrow(1, 0, before)?,
            &real.f_narrow(1, 0, before)?,
        )?;
    }
    let window = Tensor::f_zeros([b, span, v], (Kind::Float, dev))?.f_scatter(
        2,
        &ids.f_narrow(1, before, span)?.f_unsqueeze(-1)?,
        &real.f_narrow(1, before, span)?.f_unsqueeze(-1)?,
    )?;
    let seen = window
        .f_cumsum(1, Kind::Float)?
        .f_add(&seen0.f_unsqueeze(1)?)?
        .f_clamp_max(1.0)?;
    let cand = seen.f_scatter_value(-1, &target.unsqueeze(-1), 0.0)?;
    let one_minus = (-p + 1.0).clamp_min(1e-5);
    Ok(-(one_minus.log() * cand).sum_dim_intlist(-1, false, Kind::Float))
}

/// The order in which pool rows are visited: epoch e is a permutation of the pool
/// seeded by (seed, e, pool size); position n is row n % len of epoch n / len. A
/// later fit continues at the position the last one reached.
fn permutation(seed: u64, epoch: u64, len: usize) -> Vec<usize> {
    let mut h = blake3::Hasher::new_derive_key("quark-rs fit order 1");
    h.update(&seed.to_le_bytes());
    h.update(&epoch.to_le_bytes());
    h.update(&(len as u64).to_le_bytes());
    let mut xof = h.finalize_xof();
    let mut perm: Vec<usize> = (0..len).collect();
    // Fisher-Yates with unbiased draws (rejection on the 64-bit range).
    for i in (1..len).rev() {
        let bound = (i + 1) as u64;
        let zone = u64::MAX - u64::MAX % bound;
        let j = loop {
            let mut b = [0u8; 8];
            xof.fill(&mut b);
            let x = u64::from_le_bytes(b);
            if x < zone {
                break (x % bound) as usize;
            }
        };
        perm.swap(i, j);
    }
    perm
}

/// The rows of the step that starts at position `start` of the run.
fn batch_rows(rows: &[TrainRow], seed: u64, start: u64, n: usize) -> Vec<TrainRow> {
    let len = rows.len() as u64;
    let mut out = Vec::with_capacity(n);
    let mut cached: Option<(u64, Vec<usize>)> = None;
    for pos in start..start + n as u64 {
        let epoch = pos / len;
        if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            cached = Some((epoch, permutation(seed, epoch, rows.len())));
        }
        let perm = &cached.as_ref().expect("set above").1;
        out.push(rows[perm[(pos % len) as usize]].clone());
    }
    out
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
    opts.validate()?;
    let stage = Stage::new("policy", opts, &[pool, policy_dir, reference_dir])?;
    let path = stage.resolve_out_dir(out)?;
    if stage.is_done(&path) {
        return Ok(path);
    }
    crate::stage::prepare_parent(&path)?;
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

    let mut policy = Model::load(policy_dir, device, Kind::Float)?;
    if policy.control_tokens().is_none() {
        policy.add_control_tokens(k, opts.seed)?;
    }
    let have = policy.control_tokens().expect("added above").k;
    if have < k {
        bail!(
            "{}: the policy has {have} control tokens, the pool {k} quantiles",
            policy_dir.display()
        );
    }
    let compute = match opts.dtype.as_str() {
        "bf16" => Kind::BFloat16,
        _ => Kind::Float,
    };
    let mut reference = Model::load(reference_dir, device, compute)?;
    reference.var_store_mut().freeze();
    check_tokens(pool, &pool_rows, &reference, policy.position_limit())?;
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
    if compute != Kind::Float {
        // bf16 forward and backward; Adam keeps the f32 master weights it copied.
        policy.var_store_mut().set_kind(compute);
    }

    let micro = opts.batch_size / opts.grad_accum;
    let progress = crate::progress::bar(opts.progress, opts.steps, "fit", "steps");
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
        let lr = learning_rate(opts.lr, state.step, opts.warmup_steps, opts.total_steps);
        adam.step(lr, state.step + 1, scale);
        let kl_mean = kl / denom;
        metrics.push(FitMetricsRow {
            iteration: opts.iteration,
            step: state.step + 1,
            values: [
                Some(loss),
                Some(nll / denom),
                Some(kl_mean),
                Some(ent / denom),
                Some(ul / denom),
                Some(lr),
                Some(norm),
                Some(state.kl_coef),
                Some(total_tokens as f64),
                Some(total_tokens as f64 / started.elapsed().as_secs_f64().max(1e-9)),
            ],
        });
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

/// The identity of a pool row in messages: its row number and (prompt_id,
/// sample_index, iteration).
fn row_name(i: usize, r: &ScoredRow) -> String {
    let g = &r.generation;
    format!(
        "row {i} (prompt_id {}, sample_index {}, iteration {})",
        g.prompt_id, g.sample_index, g.iteration
    )
}

/// Every row's quantile is one of the pool's K, and every trained row has a prompt
/// (the reference predicts the first completion token from it).
fn check_quantiles(pool: &Path, rows: &[ScoredRow], k: u32) -> Result<()> {
    for (i, r) in rows.iter().enumerate() {
        match r.quantile {
            Some(q) if q >= k => bail!(
                "{}: {} has quantile {q}, but the pool has {k} quantiles (0..{})",
                pool.display(),
                row_name(i, r),
                k - 1
            ),
            Some(_) if r.generation.prompt_tokens.is_empty() => bail!(
                "{}: {} has no prompt tokens: the reference would have nothing to predict its first token from",
                pool.display(),
                row_name(i, r)
            ),
            _ => {}
        }
    }
    Ok(())
}

/// Every token id of the trained rows is in the reference's vocabulary (the policy
/// has those ids and its control tokens), and every row, with its control token,
/// fits the policy's positions: checked for all rows before the first step, so that
/// no bad row waits for its batch.
fn check_tokens(
    pool: &Path,
    rows: &[ScoredRow],
    reference: &Model,
    positions: Option<usize>,
) -> Result<()> {
    let vocab = reference.vocab_size();
    for (i, r) in rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.quantile.is_some())
    {
        let g = &r.generation;
        for (column, tokens) in [
            ("prompt_tokens", &g.prompt_tokens),
            ("completion_tokens", &g.completion_tokens),
        ] {
            if let Some(t) = tokens.iter().find(|&&t| i64::from(t) >= vocab) {
                bail!(
                    "{}: {} has token id {t} in `{column}`, outside the model's vocabulary of {vocab} ids (a pool sampled from another model?)",
                    pool.display(),
                    row_name(i, r)
                );
            }
        }
        let len = 1 + g.prompt_tokens.len() + g.completion_tokens.len();
        if let Some(limit) = positions.filter(|&l| len > l) {
            bail!(
                "{}: {} has {len} tokens with its control token, more than the policy's {limit} positions",
                pool.display(),
                row_name(i, r)
            );
        }
    }
    Ok(())
}

/// K: the number of quantiles the pool was cut into (from its parameters).
fn pool_quantiles(pool: &Path) -> Result<u32> {
    let meta = read_metadata(pool)
        .with_context(|| format!("{}: not a readable Parquet file", pool.display()))?;
    let params: serde_json::Value = meta
        .get(meta_key::PARAMS)
        .and_then(|p| serde_json::from_str(p).ok())
        .with_context(|| {
            format!(
                "{}: no quark.params metadata (not a quark-bin pool?)",
                pool.display()
            )
        })?;
    let k = params["quantiles"]
        .as_u64()
        .with_context(|| format!("{}: quark.params has no `quantiles`", pool.display()))?;
    let max = crate::cli::MAX_QUANTILES;
    if k == 0 || k > u64::from(max) {
        bail!(
            "{}: the pool records {k} quantiles; quark-fit takes 1 to {max}",
            pool.display()
        );
    }
    Ok(k as u32)
}
