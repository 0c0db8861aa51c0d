//! The Quark objective on a micro-batch: per completion token, the NLL of the
//! policy conditioned on the row's quantile token, β times the KL to the reference
//! (which sees the bare prompt), minus α times the policy's entropy, plus γ times
//! the token-level unlikelihood when asked; the control-token columns dropped first.

use std::collections::BTreeSet;

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use super::loss_cpu;

use crate::model::arch::ensure_grad;
use crate::model::rowwise::Element;
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
    /// Whether the vocabulary-wide part ran in the CPU's one-pass kernel
    /// ([`LossRun::one_pass`] where it applies) rather than libtorch's operations.
    pub one_pass: bool,
}

impl LossTerms {
    /// Adds another part's sums (its `tokens` and `one_pass` are not looked at).
    fn add(&mut self, t: &LossTerms) {
        self.loss += t.loss;
        self.nll += t.nll;
        self.kl += t.kl;
        self.entropy += t.entropy;
        self.unlikelihood += t.unlikelihood;
    }
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
    let run = LossRun {
        tokens_per_chunk: per_chunk,
        one_pass: true,
    };
    quark_loss_chunked(policy, reference, rows, weights, backprop, run)
}

/// How [`quark_loss_chunked`] runs the head and the loss.
#[derive(Clone, Copy, Debug)]
pub struct LossRun {
    /// Completion tokens a chunk at most (chunks differ in size by one at most).
    pub tokens_per_chunk: usize,
    /// On the CPU, the loss's vocabulary-wide part in one kernel
    /// (lib/src/fit/loss_cpu.rs) where it applies; else, as on other devices,
    /// libtorch's operations and autograd. A test holds the two to each other.
    pub one_pass: bool,
}

/// [`quark_loss`] with the head and the loss run as `run` says. The network runs
/// once on all rows; its output is cut loose from the graph, each chunk's loss is
/// differentiated down to its logits, the head's products are run back by hand
/// ([`head_backward`]), and the gradient of the network's output then goes back
/// through the network in one pass.
pub fn quark_loss_chunked(
    policy: &Model,
    reference: &Model,
    rows: &[TrainRow],
    weights: LossWeights,
    backprop: Option<Backprop>,
    run: LossRun,
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

    let heads = Heads {
        policy,
        reference,
        head,
        keep,
        vocab,
    };
    let one_pass = if run.one_pass {
        heads.one_pass(backprop.is_some())?
    } else {
        None
    };
    let mut terms = LossTerms {
        tokens: target.len() as i64,
        one_pass: one_pass.is_some(),
        ..Default::default()
    };
    let n = target.len();
    let chunks = n.div_ceil(run.tokens_per_chunk.max(1));
    for c in 0..chunks {
        let (start, end) = (c * n / chunks, (c + 1) * n / chunks);
        let part = |t: &Tensor| {
            t.f_narrow(1, start as i64, (end - start) as i64)?
                .f_squeeze_dim(0)
        };
        let chunk = Chunk {
            x: part(&cut)?,
            x0: part(&ref_hidden)?,
            target: &target[start..end],
            candidates: candidates.get(start..end).unwrap_or_default(),
            weights,
            backprop,
        };
        let (t, dx) = match &one_pass {
            Some(h) => h.run(&chunk)?,
            None => heads.run_with_tensor_ops(&chunk)?,
        };
        terms.add(&t);
        if let Some(dx) = dx {
            part(&grad_cut)?.f_copy_(&dx)?;
        }
    }
    if backprop.is_some() {
        // The network's output receives the gradient the chunks left for it.
        pass.backward(policy, &grad_cut)?;
    }
    Ok(terms)
}

/// The networks' heads, and which of their columns the loss keeps.
struct Heads<'a> {
    policy: &'a Model,
    reference: &'a Model,
    /// The policy's head `[vocab + K, d]` (control tokens past the vocabulary) or
    /// `[vocab, d]` (on spare rows).
    head: Tensor,
    /// The kept columns, where the control tokens sit inside the vocabulary.
    keep: Option<Tensor>,
    /// The reference's vocabulary size.
    vocab: i64,
}

/// One chunk of completion tokens: the networks' outputs at the positions that
/// predict them `[n, d]`, and what the loss needs of each.
struct Chunk<'a> {
    x: Tensor,
    x0: Tensor,
    target: &'a [i64],
    /// Empty when the unlikelihood term is off.
    candidates: &'a [Vec<i64>],
    weights: LossWeights,
    backprop: Option<Backprop>,
}

/// A chunk's summed terms (`tokens` left 0), and with back-propagation the
/// gradient of its `x`.
type ChunkResult = (LossTerms, Option<Tensor>);

impl Heads<'_> {
    /// The chunk by libtorch's operations, its loss differentiated by autograd down
    /// to the logits.
    fn run_with_tensor_ops(&self, c: &Chunk) -> Result<ChunkResult> {
        let (policy, reference, vocab) = (self.policy, self.reference, self.vocab);
        let device = policy.device();
        // A leaf: the loss is differentiated down to the logits only.
        let logits = tch::no_grad(|| policy.logits(&c.x))?.set_requires_grad(c.backprop.is_some());
        let ref_logits = tch::no_grad(|| reference.logits(&c.x0))?;
        let (pol_logits, ref_logits) = match &self.keep {
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
        let y = Tensor::from_slice(c.target).to(device);
        let nll = -logp.f_gather(-1, &y.unsqueeze(-1), false)?.squeeze_dim(-1);
        // KL = Σ p log p - Σ p log p0 and H = -Σ p log p: two products over the
        // vocabulary (the largest tensors here) serve all three terms.
        let p_logp = (&p * &logp).sum_dim_intlist(-1, false, Kind::Float);
        let p_logp0 = (&p * &logp0).sum_dim_intlist(-1, false, Kind::Float);
        drop(logp0);
        let kl = &p_logp - &p_logp0;
        let entropy = -p_logp;
        let w = c.weights;
        let mut per_token = &nll + &kl * w.kl - &entropy * w.entropy;
        let sum = |t: &Tensor| t.sum(Kind::Double).double_value(&[]);
        let mut terms = LossTerms::default();
        if w.unlikelihood > 0.0 {
            let ul = unlikelihood(&p, c.candidates)?;
            terms.unlikelihood = sum(&ul);
            per_token += ul * w.unlikelihood;
        }
        terms.nll = sum(&nll);
        terms.kl = sum(&kl);
        terms.entropy = sum(&entropy);
        let loss = per_token.sum(Kind::Float);
        terms.loss = loss.double_value(&[]);
        let Some(b) = c.backprop else {
            return Ok((terms, None));
        };
        (loss * b.scale).f_backward()?;
        let grad = self.head.requires_grad().then(|| self.head.grad());
        let dx = head_backward(&self.head, grad, &c.x, &logits.grad().f_tr()?)?;
        Ok((terms, Some(dx)))
    }

    /// The one-pass kernel's view of the heads, where it applies: on the CPU, in
    /// f32 or bf16 alike on both sides, with the control tokens past the vocabulary
    /// (their rows of the policy's head are left out of the products).
    fn one_pass(&self, backprop: bool) -> Result<Option<OnePass>> {
        let reference = self.reference.head();
        let kind = self.head.kind();
        let applies = self.keep.is_none()
            && self.head.device() == Device::Cpu
            && reference.device() == Device::Cpu
            && matches!(kind, Kind::Float | Kind::BFloat16)
            && reference.kind() == kind;
        if !applies {
            return Ok(None);
        }
        let rows = |t: &Tensor| t.f_narrow(0, 0, self.vocab);
        Ok(Some(OnePass {
            w: rows(&self.head)?,
            grad: (backprop && self.head.requires_grad())
                .then(|| rows(&self.head.grad()))
                .transpose()?,
            w0: reference,
        }))
    }
}

/// The heads as the one-pass kernel takes them: the policy's rows of the
/// reference's vocabulary and their gradient, and the reference's head.
struct OnePass {
    w: Tensor,
    grad: Option<Tensor>,
    w0: Tensor,
}

impl OnePass {
    /// The chunk by [`loss_cpu::loss`], on logits made vocabulary-major by the
    /// products `W xᵀ`.
    fn run(&self, c: &Chunk) -> Result<ChunkResult> {
        let (z, z0) = tch::no_grad(|| -> Result<_> {
            Ok((self.w.f_mm(&c.x.f_tr()?)?, self.w0.f_mm(&c.x0.f_tr()?)?))
        })?;
        let (vocab, _) = z.size2()?;
        // What `kernel` makes its slices of: fresh products, checked all the same.
        if !(z.is_contiguous()
            && z0.is_contiguous()
            && z0.size() == z.size()
            && z0.kind() == z.kind())
        {
            bail!(
                "the heads' products differ: {:?} and {:?}",
                z.size(),
                z0.size()
            );
        }
        let index = |&t: &i64| {
            usize::try_from(t)
                .ok()
                .filter(|&i| i < vocab as usize)
                .with_context(|| format!("token id {t} is outside the vocabulary of {vocab}"))
        };
        let targets = c.target.iter().map(index).collect::<Result<Vec<_>>>()?;
        let candidates = c
            .candidates
            .iter()
            .map(|cs| cs.iter().map(index).collect())
            .collect::<Result<Vec<Vec<_>>>>()?;
        let gz = c.backprop.map(|_| Tensor::f_empty_like(&z)).transpose()?;
        let w = c.weights;
        let weights = loss_cpu::Weights {
            kl: w.kl as f32,
            entropy: w.entropy as f32,
            unlikelihood: w.unlikelihood as f32,
        };
        let scale = c.backprop.map_or(0.0, |b| b.scale as f32);
        let grad = gz.as_ref().map(|g| (g, scale));
        // SAFETY: `z` and `z0` are the products' fresh contiguous CPU outputs in the
        // heads' dtype (f32 or bf16, which `one_pass` checked), and `gz` a fresh
        // tensor like them, each its own storage, alive for the call.
        let per_token = unsafe {
            match z.kind() {
                Kind::Float => kernel::<f32>(&z, &z0, grad, &targets, &candidates, weights),
                Kind::BFloat16 => kernel::<u16>(&z, &z0, grad, &targets, &candidates, weights),
                other => bail!("the one-pass loss takes f32 or bf16 logits, not {other:?}"),
            }
        };
        let mut terms = LossTerms::default();
        for t in &per_token {
            terms.nll += t.nll;
            terms.kl += t.kl;
            terms.entropy += t.entropy;
            terms.unlikelihood += t.unlikelihood;
            terms.loss +=
                t.nll + w.kl * t.kl - w.entropy * t.entropy + w.unlikelihood * t.unlikelihood;
        }
        let dx = gz
            .map(|gz| {
                head_backward(
                    &self.w,
                    self.grad.as_ref().map(Tensor::shallow_clone),
                    &c.x,
                    &gz,
                )
            })
            .transpose()?;
        Ok((terms, dx))
    }
}

/// [`loss_cpu::loss`] on the policy's and the reference's logits `z`, `z0`
/// `[vocab, tokens]`, and with `grad` = (tensor, scale) the gradient written into
/// that tensor.
///
/// # Safety
/// The tensors are contiguous CPU arrays of E of one shape; the gradient's is a
/// storage of its own.
unsafe fn kernel<E: Element>(
    z: &Tensor,
    z0: &Tensor,
    grad: Option<(&Tensor, f32)>,
    targets: &[usize],
    candidates: &[Vec<usize>],
    weights: loss_cpu::Weights,
) -> Vec<loss_cpu::Token> {
    let (vocab, tokens) = (z.size()[0] as usize, z.size()[1] as usize);
    let read = |t: &Tensor| {
        // SAFETY: as the caller promises.
        unsafe { std::slice::from_raw_parts(t.data_ptr() as *const E, t.numel()) }
    };
    let logits = loss_cpu::Logits {
        policy: read(z),
        reference: read(z0),
        vocab,
        tokens,
    };
    // SAFETY: as the caller promises.
    let write = |(g, s): (&Tensor, f32)| {
        (
            unsafe { std::slice::from_raw_parts_mut(g.data_ptr() as *mut E, g.numel()) },
            s,
        )
    };
    loss_cpu::loss(&logits, targets, candidates, weights, grad.map(write))
}

/// The head's products run back by hand for a chunk: `x` `[n, d]` went through the
/// head `w` `[rows, d]` to logits whose gradient, vocabulary-major, is `g_t`
/// `[rows, n]` (f32, or `w`'s dtype). Adds `g_t x` to `grad` (`w`'s gradient, or
/// rows of it) in place (autograd would build it anew for every chunk, 113 MB for
/// SmolLM2's head, and then add it) and returns the gradient of `x`, `g_tᵀ w`. In
/// `w`'s dtype, as autograd's products would run.
fn head_backward(w: &Tensor, grad: Option<Tensor>, x: &Tensor, g_t: &Tensor) -> Result<Tensor> {
    tch::no_grad(|| {
        let g_t = g_t.f_to_kind(w.kind())?;
        if let Some(mut grad) = grad {
            let _ = grad.f_addmm_(&g_t, x)?;
        }
        Ok(g_t.f_tr()?.f_mm(w)?)
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
