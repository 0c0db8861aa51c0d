//! The Quark objective on a micro-batch: per completion token, the NLL of the
//! policy conditioned on the row's quantile token, β times the KL to the reference
//! (which sees the bare prompt), minus α times the policy's entropy, plus γ times
//! the token-level unlikelihood when asked; the control-token columns dropped first.

use std::collections::BTreeSet;

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

use crate::model::{Model, Packed};
use crate::schema::ScoredRow;

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

/// Every row has a prompt: the reference predicts the first completion token from it.
fn require_prompts(rows: &[TrainRow]) -> Result<()> {
    if rows.iter().any(|r| r.prompt.is_empty()) {
        bail!("a pool row has no prompt tokens: the reference would have nothing to predict its first token from");
    }
    Ok(())
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
/// gradients) are built for as many completion tokens at a time as keep each under
/// this many elements (just under 32 MiB in f32: glibc's heap serves blocks below
/// that, lib/src/allocator.rs, so they are reused step after step rather than
/// faulted in fresh): they, not the network, would otherwise set the peak. (In
/// bf16 the head's gradient is then summed over the chunks in bf16: a rounding or
/// two of its partial sums.)
const LOSS_CHUNK_ELEMENTS: i64 = (1 << 23) - (1 << 12);

/// The Quark loss of `rows` (policy conditioned on each row's quantile token, the
/// reference on the bare prompt), with the control-token columns dropped; with
/// `backprop`, its gradient goes into the policy's. The rows run packed end to end
/// ([`Packed`]): no padding token passes through the dense products, and the head
/// and the loss run on the completion tokens alone.
pub fn quark_loss(
    policy: &Model,
    reference: &Model,
    rows: &[TrainRow],
    weights: LossWeights,
    backprop: Option<Backprop>,
) -> Result<LossTerms> {
    // The policy's logits are the wider (its control tokens' columns too).
    let per_chunk = (LOSS_CHUNK_ELEMENTS / policy.vocab_size().max(1)).max(1) as usize;
    quark_loss_chunked(policy, reference, rows, weights, backprop, per_chunk)
}

/// [`quark_loss`] with the head and the loss run on at most `tokens_per_chunk`
/// completion tokens at a time (in chunks whose sizes differ by one at most). The
/// network runs once on all rows; its output is cut loose from the graph, each
/// chunk's loss is differentiated down to its logits, the head's products are run back by hand
/// ([`head_backward`]), and the gradient of the network's output then goes back
/// through the network in one pass.
pub fn quark_loss_chunked(
    policy: &Model,
    reference: &Model,
    rows: &[TrainRow],
    weights: LossWeights,
    backprop: Option<Backprop>,
    tokens_per_chunk: usize,
) -> Result<LossTerms> {
    // Checked before anything runs, so that a bad row leaves no partial gradient.
    require_prompts(rows)?;
    let _no_grad = backprop.is_none().then(tch::no_grad_guard);
    let control = policy
        .control_tokens()
        .context("the policy has no control tokens")?;
    let device = policy.device();
    let vocab = reference.vocab_size();
    // Each row without its last token: that token is only a target, and what the
    // networks make of it would predict nothing (causal attention keeps it out of
    // every earlier position).
    let seq = |r: &TrainRow| -> Vec<i64> {
        let inputs = &r.completion[..r.completion.len().saturating_sub(1)];
        r.prompt.iter().chain(inputs).map(|&t| t as i64).collect()
    };
    let ref_rows: Vec<Vec<i64>> = rows.iter().map(seq).collect();
    let pol_rows: Vec<Vec<i64>> = rows
        .iter()
        .zip(&ref_rows)
        .map(|(r, s)| {
            std::iter::once(control.first_id + r.quantile as i64)
                .chain(s.iter().copied())
                .collect()
        })
        .collect();
    let pol_batch = Packed::new(&pol_rows, device)?;
    let ref_batch = Packed::new(&ref_rows, device)?;

    // The positions that predict a completion token, row after row: the reference's
    // P - 1 + j predicts completion token j after a prompt of P, the policy's P + j
    // (one control token more in front).
    let mut pol_at = Vec::new();
    let mut ref_at = Vec::new();
    for (r, row) in rows.iter().enumerate() {
        for j in 0..row.completion.len() {
            let pos = row.prompt.len() - 1 + j;
            ref_at.push(ref_batch.index(r, pos));
            pol_at.push(pol_batch.index(r, pos + 1));
        }
    }
    let on_device = |v: &[i64]| Tensor::from_slice(v).to(device);
    let checkpoint = backprop.is_some_and(|b| b.checkpoint);
    let pass = policy.train_forward(&pol_batch, &on_device(&pol_at), checkpoint)?;
    let ref_hidden = tch::no_grad(|| reference.packed_hidden(&ref_batch, &on_device(&ref_at)))?;
    drop((pol_batch, ref_batch));
    let cut = pass.hidden().detach();
    let head = policy.head();
    if backprop.is_some() {
        ensure_grad(&head)?;
    }
    let grad_cut = Tensor::f_zeros_like(&cut)?;
    // The control-token columns are dropped from both sides: past the reference's
    // vocabulary as usual, or inside it when the embedding had spare rows that
    // became the control tokens.
    let keep = (control.first_id < vocab).then(|| {
        let ids: Vec<i64> = (0..vocab)
            .filter(|id| !control.ids().contains(id))
            .collect();
        on_device(&ids)
    });
    // Token ids as columns of the kept logits: with the control tokens inside the
    // vocabulary, the (spare) ids above them move down by K.
    let column = |t: i64| match keep {
        Some(_) if t >= control.ids().end => t - control.k as i64,
        _ => t,
    };

    // Each completion token's target column and, for the unlikelihood term, its
    // negative candidates: the distinct earlier tokens of its row (prompt and
    // completion so far) other than the target, as columns.
    let mut target = Vec::with_capacity(pol_at.len());
    let mut candidates = Vec::new();
    for row in rows {
        let mut seen: BTreeSet<i64> = row.prompt.iter().map(|&t| column(t as i64)).collect();
        for &t in &row.completion {
            let y = column(t as i64);
            target.push(y);
            if weights.unlikelihood > 0.0 {
                candidates.push(seen.iter().copied().filter(|&c| c != y).collect());
            }
            seen.insert(y);
        }
    }

    let mut terms = LossTerms {
        tokens: target.len() as i64,
        ..Default::default()
    };
    let n = target.len();
    let chunks = n.div_ceil(tokens_per_chunk.max(1));
    for c in 0..chunks {
        let (start, end) = (c * n / chunks, (c + 1) * n / chunks);
        let len = end - start;
        let part = |t: &Tensor| t.f_narrow(1, start as i64, len as i64)?.f_squeeze_dim(0);
        let x = part(&cut)?;
        // A leaf: the loss is differentiated down to the logits only.
        let logits = tch::no_grad(|| policy.logits(&x))?.set_requires_grad(backprop.is_some());
        let ref_logits = tch::no_grad(|| reference.logits(&part(&ref_hidden)?))?;
        let (pol_logits, ref_logits) = match &keep {
            None => (logits.f_narrow(1, 0, vocab)?, ref_logits),
            Some(keep) => (
                logits.f_index_select(1, keep)?,
                ref_logits.f_index_select(1, keep)?,
            ),
        };
        let logp = pol_logits.f_log_softmax(-1, Kind::Float)?;
        drop(pol_logits);
        let logp0 = ref_logits.f_log_softmax(-1, Kind::Float)?;
        drop(ref_logits);
        let p = logp.exp();
        let y = on_device(&target[start..end]);
        let nll = -logp.f_gather(-1, &y.unsqueeze(-1), false)?.squeeze_dim(-1);
        // KL = Σ p log p - Σ p log p0 and H = -Σ p log p: two products over the
        // vocabulary (the largest tensors here) serve all three terms.
        let p_logp = (&p * &logp).sum_dim_intlist(-1, false, Kind::Float);
        let p_logp0 = (&p * &logp0).sum_dim_intlist(-1, false, Kind::Float);
        drop(logp0);
        let kl = &p_logp - &p_logp0;
        let entropy = -p_logp;
        let mut per_token = &nll + &kl * weights.kl - &entropy * weights.entropy;
        let sum = |t: &Tensor| t.sum(Kind::Double).double_value(&[]);
        if weights.unlikelihood > 0.0 {
            let ul = unlikelihood(&p, &candidates[start..end])?;
            terms.unlikelihood += sum(&ul);
            per_token += ul * weights.unlikelihood;
        }
        terms.nll += sum(&nll);
        terms.kl += sum(&kl);
        terms.entropy += sum(&entropy);
        let loss = per_token.sum(Kind::Float);
        terms.loss += loss.double_value(&[]);
        if let Some(b) = backprop {
            (loss * b.scale).f_backward()?;
            let dx = head_backward(&head, &x, &logits.grad())?;
            part(&grad_cut)?.f_copy_(&dx)?;
        }
    }
    if backprop.is_some() {
        // The network's output receives the gradient the chunks left for it.
        pass.backward(policy, &grad_cut)?;
    }
    Ok(terms)
}

/// Gives a trainable `w` a gradient (zeros) where it has none yet, so that
/// [`head_backward`] can add into it.
fn ensure_grad(w: &Tensor) -> Result<()> {
    if w.requires_grad() && !w.grad().defined() {
        w.f_mul_scalar(0.0)?.f_sum(Kind::Float)?.f_backward()?;
    }
    Ok(())
}

/// The head's products run back by hand for a chunk: `x` `[n, d]` went through the
/// head `w` `[vocab, d]` to logits whose gradient is `dlogits` `[n, vocab]` (f32).
/// Adds `dlogitsᵀ x` to `w`'s gradient in place (autograd would build it anew for
/// every chunk, 113 MB for SmolLM2's head, and then add it) and returns the gradient
/// of `x`, `dlogits w`. In `w`'s dtype, as autograd's products would run.
fn head_backward(w: &Tensor, x: &Tensor, dlogits: &Tensor) -> Result<Tensor> {
    tch::no_grad(|| {
        let g = dlogits.f_to_kind(w.kind())?;
        if w.requires_grad() {
            let mut grad = w.grad();
            let _ = grad.f_addmm_(&g.f_tr()?, x)?;
        }
        Ok(g.f_mm(w)?)
    })
}

/// Token-level unlikelihood (Welleck et al. 2020): at each completion token, its
/// negative candidates (the distinct earlier tokens of the sequence, prompt and
/// completion up to the position that predicts it, other than the target; columns
/// of `p` `[n, v]`, a list a token) each add -log(1 - p(c)).
fn unlikelihood(p: &Tensor, candidates: &[Vec<i64>]) -> Result<Tensor> {
    let n = candidates.len();
    let width = candidates.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let mut ids = vec![0i64; n * width];
    let mut real = vec![0f32; n * width];
    for (i, c) in candidates.iter().enumerate() {
        ids[i * width..i * width + c.len()].copy_from_slice(c);
        real[i * width..i * width + c.len()].fill(1.0);
    }
    let shape = [n as i64, width as i64];
    let dev = p.device();
    let ids = Tensor::from_slice(&ids).view(shape).to(dev);
    let real = Tensor::from_slice(&real).view(shape).to(dev);
    let one_minus = (-p.f_gather(1, &ids, false)? + 1.0).clamp_min(1e-5);
    Ok(-(one_minus.log() * real).sum_dim_intlist(-1, false, Kind::Float))
}
