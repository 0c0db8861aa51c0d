//! The Quark objective on a micro-batch: per completion token, the NLL of the
//! policy conditioned on the row's quantile token, β times the KL to the reference
//! (which sees the bare prompt), minus α times the policy's entropy, plus γ times
//! the token-level unlikelihood when asked; the control-token columns dropped first.

use anyhow::{bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::model::Model;
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

impl TrainRow {
    /// Its length as the policy sees it: control token, prompt and completion.
    pub fn policy_len(&self) -> usize {
        1 + self.prompt.len() + self.completion.len()
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

impl LossTerms {
    /// Adds the terms of more rows.
    fn add(&mut self, other: LossTerms) {
        self.loss += other.loss;
        self.nll += other.nll;
        self.kl += other.kl;
        self.entropy += other.entropy;
        self.unlikelihood += other.unlikelihood;
        self.tokens += other.tokens;
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

/// The price of one more length group, in padded tokens: each group runs the network
/// once more, on smaller matrix products. At 64, a bf16 step on the default pool took
/// 2.25 s against 2.70 s as one padded batch (2 cores, README "Measured").
pub const GROUP_COST_TOKENS: usize = 64;

/// The rows of a batch (given by their lengths) cut into groups of similar length,
/// each to be padded to its own longest row: the partition of the rows sorted by
/// length that pads the fewest tokens, counting `group_cost` tokens for every
/// group. Each group lists indices into `lengths`, shortest rows first.
pub fn length_groups(lengths: &[usize], group_cost: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by_key(|&i| lengths[i]);
    let n = order.len();
    // best[i]: the cheapest cost of the rows order[i..]; cut[i]: where its first
    // group ends.
    let mut best = vec![0usize; n + 1];
    let mut cut = vec![n; n + 1];
    for i in (0..n).rev() {
        // (On a tie, the longer first group: fewer groups.)
        (best[i], cut[i]) = (i + 1..=n)
            .map(|j| ((j - i) * lengths[order[j - 1]] + group_cost + best[j], j))
            .min_by_key(|&(cost, j)| (cost, std::cmp::Reverse(j)))
            .expect("i < n");
    }
    let mut groups = Vec::new();
    let mut i = 0;
    while i < n {
        groups.push(order[i..cut[i]].to_vec());
        i = cut[i];
    }
    groups
}

/// The Quark loss of `rows` (policy conditioned on each row's quantile token, the
/// reference on the bare prompt), with the control-token columns dropped; with
/// `backprop`, its gradient goes into the policy's. The rows run in groups of
/// similar length ([`length_groups`]), so that padding costs little: the terms and
/// the gradient are sums over rows, the same for any grouping (in bf16 the groups'
/// gradients add up in bf16, as the head's chunks do).
pub fn quark_loss(
    policy: &Model,
    reference: &Model,
    rows: &[TrainRow],
    weights: LossWeights,
    backprop: Option<Backprop>,
) -> Result<LossTerms> {
    quark_loss_grouped(
        policy,
        reference,
        rows,
        weights,
        backprop,
        GROUP_COST_TOKENS,
    )
}

/// [`quark_loss`] with the groups cut at `group_cost` tokens a group (0: every
/// distinct length a group of its own).
pub fn quark_loss_grouped(
    policy: &Model,
    reference: &Model,
    rows: &[TrainRow],
    weights: LossWeights,
    backprop: Option<Backprop>,
    group_cost: usize,
) -> Result<LossTerms> {
    // Checked before any group runs, so that a bad row leaves no partial gradient.
    require_prompts(rows)?;
    let lengths: Vec<usize> = rows.iter().map(TrainRow::policy_len).collect();
    let mut terms = LossTerms::default();
    for group in length_groups(&lengths, group_cost) {
        let part: Vec<TrainRow> = group.iter().map(|&i| rows[i].clone()).collect();
        let span = part.iter().map(|r| r.completion.len()).max().unwrap_or(0) as i64;
        let per_row = (span * reference.vocab_size()).max(1);
        let chunk = (LOSS_CHUNK_ELEMENTS / per_row).max(1) as usize;
        terms.add(quark_loss_chunked(
            policy, reference, &part, weights, backprop, chunk,
        )?);
    }
    Ok(terms)
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
    require_prompts(rows)?;
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
